"""Causal attention throughput: gptfast's Triton kernel against PyTorch's SDPA backends.

    python -m gptfast.bench.attention [--head-dims 64,128] [--seq-lens 512,1024,...,16384]
                                      [--tokens 16384] [--dtype bf16]

Sweeps T at a fixed number of tokens per call (B = tokens // T), head dim 64 with 12 heads
and 128 with 16 heads, and reports TFLOP/s forward and forward+backward for gptfast
(deterministic backward, and the optional atomic-dQ backward) and SDPA's flash (FA2),
cuDNN and memory-efficient backends, all in one run. FLOPs: fwd = 2*B*H*T*T*D (the causal
half of 4*B*H*T*T*D), fwd+bwd = 3.5 x fwd. A backend that fails is reported as "n/a" with
the reason under the table. Without CUDA it says so and runs a tiny CPU sanity check.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from gptfast.bench.common import Meter, markdown_table, parse_ints, short_reason

HEADS_FOR_HEAD_DIM = {64: 12, 128: 16}
DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def heads_for(head_dim):
    """12 heads at hd64, 16 at hd128 (GPT-2 small / a 2k-wide model); width 2048 otherwise."""
    return HEADS_FOR_HEAD_DIM.get(head_dim, max(1, 2048 // head_dim))


def forward_flops(batch, heads, seq, head_dim):
    return 2.0 * batch * heads * seq * seq * head_dim


def _gptfast_attention(atomic_dq):
    import gptfast
    from gptfast.kernels import attention

    def run(q, k, v):
        previous = attention.set_atomic_dq(atomic_dq)
        try:
            with gptfast.use_backend("triton"):
                return gptfast.causal_attention(q, k, v)
        finally:
            attention.set_atomic_dq(previous)
    return run


def _sdpa_attention(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


PROVIDERS = {
    "gptfast": lambda: _gptfast_attention(False),
    "gptfast atomic-dQ": lambda: _gptfast_attention(True),
    "SDPA flash": lambda: _sdpa_attention("FLASH_ATTENTION"),
    "SDPA cuDNN": lambda: _sdpa_attention("CUDNN_ATTENTION"),
    "SDPA mem-eff": lambda: _sdpa_attention("EFFICIENT_ATTENTION"),
}


def closures(attention, q, k, v, grad_out):
    """(forward, forward+backward) of one provider; gradients by autograd.grad (no accumulation)."""
    inputs = (q, k, v)

    def forward():
        with torch.no_grad():
            attention(q, k, v)

    def forward_backward():
        out = attention(q, k, v)
        torch.autograd.grad(out, inputs, grad_out)

    return forward, forward_backward


def make_inputs(head_dim, seq, tokens, dtype, device="cuda", heads=None):
    """q, k, v (B, H, T, D) with B = tokens // T (at least 1) and H = ``heads`` (default
    :func:`heads_for`), the gradient of the output, and the forward FLOPs."""
    heads, batch = heads or heads_for(head_dim), max(1, tokens // seq)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    return q, k, v, grad_out, forward_flops(batch, heads, seq, head_dim)


def bench_shape(head_dim, seq, tokens, dtype, providers, device="cuda", meter=None, heads=None):
    """One row per (head dim, T): TFLOP/s "fwd / fwd+bwd" per provider, and the failures.
    ``row["measured"][name]`` holds the (fwd, fwd+bwd) :class:`~.common.Measured` of each."""
    meter = meter or Meter(device)
    q, k, v, grad_out, flops = make_inputs(head_dim, seq, tokens, dtype, device, heads)
    row = {"hd": head_dim, "H": q.shape[1], "B": q.shape[0], "T": seq, "measured": {}}
    notes, results = [], {}
    for name in providers:
        forward, forward_backward = closures(PROVIDERS[name](), q, k, v, grad_out)
        # forward+backward first: its first call compiles / autotunes both directions
        fwd_bwd = meter.measure(forward_backward)
        fwd = meter.measure(forward) if fwd_bwd.status == "ok" else fwd_bwd
        row["measured"][name] = (fwd, fwd_bwd)
        failed = next((m for m in (fwd_bwd, fwd) if m.status != "ok"), None)
        if failed is not None:  # a backend that cannot run this case is a result, not a crash
            row[name] = "OOM" if failed.status == "oom" else "n/a"
            if failed.status != "oom":
                notes.append(f"{name} hd{head_dim} T{seq}: {failed.error}")
            continue
        fwd_tflops, fwd_bwd_tflops = flops / fwd.ms / 1e9, 3.5 * flops / fwd_bwd.ms / 1e9
        results[name] = (fwd_tflops, fwd_bwd_tflops)
        row[name] = f"{fwd_tflops:.0f} / {fwd_bwd_tflops:.0f}"
    ours = results.get("gptfast")
    for baseline, column in (("SDPA cuDNN", "vs cuDNN"), ("SDPA flash", "vs FA2")):
        if ours and baseline in results:
            fwd_ratio, fwd_bwd_ratio = (ours[i] / results[baseline][i] for i in (0, 1))
            row[column] = f"{fwd_ratio:.2f}x / {fwd_bwd_ratio:.2f}x"
    if "gptfast" in results and "SDPA flash" in results:
        with torch.no_grad():
            diff = (_gptfast_attention(False)(q, k, v).float()
                    - _sdpa_attention("FLASH_ATTENTION")(q, k, v).float()).abs().max().item()
        row["max abs diff vs flash"] = f"{diff:.1e}"
    return row, notes


def cpu_sanity():
    """No GPU: run the kernel once through the Triton interpreter on a tiny case (when it
    can still be switched on in this process) and check it against the reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import gptfast
    from gptfast import reference

    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    expected = reference.causal_attention(q, k, v)
    rows = []
    try:
        from gptfast.kernels import attention  # noqa: F401  (imports triton)

        with gptfast.use_backend("triton"):
            fn = lambda: gptfast.causal_attention(q, k, v)  # noqa: E731
            error = (fn() - expected).abs().max().item()
            rows.append({"provider": "gptfast (Triton interpreter)", "shape": "1x2x64x32 fp32",
                         "ms": Meter("cpu", 10, 30).time(fn).median_ms,
                         "max abs error": f"{error:.1e}"})
    except Exception as err:
        rows.append({"provider": "gptfast (Triton interpreter)", "shape": "1x2x64x32 fp32",
                     "ms": "n/a", "max abs error": short_reason(err)})
    fn = lambda: reference.causal_attention(q, k, v)  # noqa: E731
    rows.append({"provider": "reference (SDPA on CPU)", "shape": "1x2x64x32 fp32",
                 "ms": Meter("cpu", 10, 30).time(fn).median_ms, "max abs error": "0"})
    print(markdown_table(rows, ["provider", "shape", "ms", "max abs error"]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    parser.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)),
                        help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=16384, help="B * T per call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of: {', '.join(PROVIDERS)}")
    args = parser.parse_args(argv)
    head_dims, seq_lens = parse_ints(args.head_dims), parse_ints(args.seq_lens)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")

    if not torch.cuda.is_available():
        print("No CUDA device: the attention benchmark needs an NVIDIA GPU. "
              "Tiny CPU sanity run instead:\n")
        cpu_sanity()
        return 0

    dtype = DTYPES[args.dtype]
    print(f"# Causal attention, {args.dtype}, {args.tokens} tokens per call, "
          f"{torch.cuda.get_device_name()}")
    print("TFLOP/s fwd / fwd+bwd (fwd = 2*B*H*T*T*D, fwd+bwd = 3.5 x fwd)\n")
    columns = ["hd", "H", "B", "T", *providers, "vs cuDNN", "vs FA2", "max abs diff vs flash"]
    for head_dim in head_dims:
        rows, notes = [], []
        for seq in seq_lens:
            row, row_notes = bench_shape(head_dim, seq, args.tokens, dtype, providers)
            rows.append(row)
            notes += row_notes
            print(f"  done hd{head_dim} T{seq}", file=sys.stderr, flush=True)
        print(markdown_table(rows, columns))
        for note in notes:
            print(f"- n/a: {note}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
