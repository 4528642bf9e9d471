"""Roofline floors of the headline shapes on H100 SXM and H200 (``--roofline``): bytes and
FLOPs each op must move and compute, and the time floor they set."""

from __future__ import annotations


H100_SXM_BYTES_PER_S = 3.35e12
H200_BYTES_PER_S = 4.8e12
BF16_DENSE_FLOP_PER_S = 989e12  # H100 SXM and H200


def roofline_floors() -> list[dict]:
    """Bytes and FLOPs of each headline op (the minimum any kernel must move and compute)
    and the time floor max(bytes / bandwidth, FLOPs / 989 TFLOP/s) on H100 SXM and H200.

    Attention (causal, so half the T x T scores): forward 2 matmuls = 2 B H T^2 D FLOPs and
    reads Q, K, V, writes O (+ fp32 lse); backward 5 matmuls = 5 B H T^2 D FLOPs and reads
    Q, K, V, O, dO, lse, writes dQ, dK, dV. LayerNorm: read x (and r), write y (and s);
    backward read x (or s), dy (and ds), write dx. Cross-entropy with the gradient written
    into the logits: one read and one write of N x V.
    """
    rows = []

    def add(op, shape, dtype, nbytes, flops=0.0):
        floor_h100 = max(nbytes / H100_SXM_BYTES_PER_S, flops / BF16_DENSE_FLOP_PER_S)
        floor_h200 = max(nbytes / H200_BYTES_PER_S, flops / BF16_DENSE_FLOP_PER_S)
        rows.append(dict(op=op, shape=shape, dtype=dtype, mbytes=nbytes / 1e6, gflop=flops / 1e9,
                         h100_us=floor_h100 * 1e6, h200_us=floor_h200 * 1e6,
                         bound="compute" if flops / BF16_DENSE_FLOP_PER_S > nbytes / H100_SXM_BYTES_PER_S
                         else "memory"))

    for b, h, t, d in ((8, 12, 1024, 64), (1, 12, 8192, 64), (8, 16, 1024, 128), (1, 16, 8192, 128)):
        shape, tile = f"B{b} H{h} T{t} D{d}", b * h * t * d * 2
        add("attention fwd", shape, "bf16", 4 * tile + b * h * t * 4, 2.0 * b * h * t * t * d)
        add("attention bwd", shape, "bf16", 8 * tile + 2 * b * h * t * 4, 5.0 * b * h * t * t * d)
    for n, c, size, name in ((65536, 768, 4, "fp32"), (65536, 768, 2, "bf16"), (16384, 4096, 2, "bf16"),
                             (8192, 8192, 2, "bf16"), (4096, 16384, 2, "bf16")):
        add("layer_norm fwd", f"{n}x{c}", name, 2 * n * c * size)
        add("layer_norm bwd", f"{n}x{c}", name, 3 * n * c * size)
        add("add_layer_norm fwd", f"{n}x{c}", name, 4 * n * c * size)
        add("add_layer_norm bwd", f"{n}x{c}", name, 4 * n * c * size)
    for size, name in ((2, "bf16"), (4, "fp32")):
        add("cross_entropy loss+grad", "N16384 V50257", name, 2 * 16384 * 50257 * size)
    return rows


def roofline_table() -> str:
    lines = ["| op | shape | dtype | MB moved | GFLOP | bound | floor H100 SXM us | floor H200 us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in roofline_floors():
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mbytes']:.0f} | "
                     f"{r['gflop']:.0f} | {r['bound']} | {r['h100_us']:.0f} | {r['h200_us']:.0f} |")
    return "\n".join(lines)
