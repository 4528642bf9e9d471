"""rotary_qk_norm bandwidth: gptfast's one-pass kernel against nanochat's three ops.

    python -m gptfast.bench.rotary [--dtype bf16|fp16|fp32]
                                   [--shapes 8x2048x10x10x128,32x2048x10x10x128,...]

Each shape is B x T x H x Hkv x D. q and k are views of one fused projection output
(B, T, (H + 2 Hkv) D), as in a model; every implementation computes nanochat's QK step,
rotary by -theta, parameter-free RMSNorm, times 1.2:
- ``gptfast``: ``gptfast.rotary_qk_norm(q, k, cos, -sin, scale=1.2)`` on the Triton backend;
- ``eager``: nanochat's sequence written out here (``apply_rotary_emb``, ``F.rms_norm``,
  ``* 1.2``) in plain torch;
- ``compile``: ``torch.compile`` of that function;
- ``liger``: Liger's RoPE kernel (``liger_rotary_pos_emb``, on (B, H, T, D) views, with
  nanochat's sign) followed by the same ``F.rms_norm * 1.2``; "unavailable" without
  liger_kernel.

Prints one markdown table of GB/s (bytes moved / median time), with the device-to-device copy
ceiling of q and k measured in the same run. Bytes, with N = B T (H + Hkv) D elements:
    fwd      = read q, k + write q', k'           = 2 N bytes-per-element
    fwd+bwd  = fwd + read q, k, dq', dk' + write dq, dk = 5 N
(the cos/sin rows are not counted), so the figure compares implementations that move more.

Without CUDA it runs the whole measurement at a tiny shape on the CPU (the kernel through the
Triton interpreter, torch.compile with the backend of ``GPTFAST_BENCH_COMPILE_BACKEND``),
checks gptfast against the fp64 reference and exits 0: CPU timings mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

from .common import DTYPES, Measured, Meter, compiled, markdown_table

DEFAULT_SHAPES = "8x2048x10x10x128,32x2048x10x10x128,16x1024x12x12x64"
CPU_SHAPE = (1, 8, 2, 1, 16)
SCALE = 1.2  # nanochat's q, k multiplier
BASE = 100000.0  # nanochat's rotary base


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"8x2048x10x10x128,..." -> [(B, T, H, Hkv, D), ...]; an argparse type."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 5 or min(shape) < 1 or shape[4] % 2:
            raise argparse.ArgumentTypeError(
                f"shape {item!r} is not BxTxHxHkvxD with positive sizes and even D "
                f"(e.g. 8x2048x10x10x128)")
        shapes.append(shape)
    return shapes


def tables(t: int, d: int, device, dtype=torch.float32):
    """nanochat's cos, sin (T, D/2): angles t * base^(-2i/D)."""
    inv_freq = BASE ** -(torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32, device=device), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def nanochat_rotary(x, cos, sin):
    """nanochat's apply_rotary_emb (rotation by -theta), x (B, T, H, D), cos/sin (T, D/2)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c + x2 * s, x1 * (-s) + x2 * c], 3)


def nanochat_qk(q, k, cos, sin):
    """rotary, then F.rms_norm (the input dtype's eps), then * 1.2, as nanochat's attention."""
    q, k = nanochat_rotary(q, cos, sin), nanochat_rotary(k, cos, sin)
    q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))
    return q * SCALE, k * SCALE


def _liger():
    """Liger's RoPE + torch's rms_norm, or the reason Liger is unavailable."""
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as err:
        return None, f"liger_kernel does not import ({type(err).__name__})"

    def run(q, k, cos, sin):
        # Liger takes (B, H, T, D) and full-width (1, T, D) tables in the Hugging Face sign:
        # nanochat's -theta is +theta with -sin
        full_cos = torch.cat([cos, cos], -1)[None]
        full_sin = -torch.cat([sin, sin], -1)[None]
        qr, kr = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
        qr, kr = qr.transpose(1, 2), kr.transpose(1, 2)
        return F.rms_norm(qr, (qr.shape[-1],)) * SCALE, F.rms_norm(kr, (kr.shape[-1],)) * SCALE
    return run, None


def implementations():
    """name -> fn(q, k, cos, sin) -> (q', k'), or the reason it cannot run (a string)."""
    import gptfast

    def ours(q, k, cos, sin):
        with gptfast.use_backend("triton"):
            return gptfast.rotary_qk_norm(q, k, cos, -sin, scale=SCALE)

    liger, reason = _liger()
    return {"gptfast": ours, "eager": nanochat_qk,
            "compile": compiled(nanochat_qk, dynamic=False),
            "liger": liger if liger is not None else f"unavailable: {reason}"}


def _gbps(nbytes: int, ms: float | None) -> float | None:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def _inputs(shape, dtype, device):
    b, t, h, hkv, d = shape
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, device=device, dtype=dtype)
    heads = qkv.view(b, t, h + 2 * hkv, d)
    return qkv, heads[:, :, :h], heads[:, :, h:h + hkv]


def bench_shape(shape, dtype: torch.dtype, impls, device: str = "cuda",
                meter: Meter | None = None) -> dict:
    """One row: GB/s per implementation and pass, the copy, and each implementation's max
    |q' - eager q'| (fwd, fp32); ``row["measured"]`` holds each cell's Measured."""
    meter = meter or Meter(device)
    b, t, h, hkv, d = shape
    elements = b * t * (h + hkv) * d
    size = torch.empty(0, dtype=dtype).element_size()
    qkv, q, k = _inputs(shape, dtype, device)
    cos, sin = tables(t, d, device, dtype)
    row = {"B x T x H x Hkv x D": "x".join(map(str, shape)),
           "dtype": str(dtype).replace("torch.", ""), "measured": {}, "bytes": {}, "notes": []}

    def record(column, nbytes, fn):
        measured = row["measured"][column] = meter.measure(fn)
        row["bytes"][column] = nbytes
        row[column] = _gbps(nbytes, measured.ms)
        if measured.status != "ok":
            row["notes"].append(f"{column}: {measured.status}: {measured.error}")
            print(f"  {row['B x T x H x Hkv x D']} {column}: {measured.status}: {measured.error}",
                  file=sys.stderr)

    src = torch.cat([q.reshape(-1), k.reshape(-1)])
    dst = torch.empty_like(src)
    record("copy", 2 * elements * size, functools.partial(dst.copy_, src))
    del src, dst

    with torch.no_grad():
        expected = nanochat_qk(q.float(), k.float(), cos.float(), sin.float())[0]
    grads = (torch.randn(b, t, h, d, device=device, dtype=dtype),
             torch.randn(b, t, hkv, d, device=device, dtype=dtype))
    for name, fn in impls.items():
        if isinstance(fn, str):  # a reason it cannot run here
            for direction in ("fwd", "fwd+bwd"):
                row[f"{name} {direction}"] = None
                row["measured"][f"{name} {direction}"] = Measured(status="unavailable", error=fn)
            row["notes"].append(f"{name}: {fn}")
            continue
        leaf = qkv.detach().requires_grad_()
        heads = leaf.view(b, t, h + 2 * hkv, d)
        qg, kg = heads[:, :, :h], heads[:, :, h:h + hkv]
        print(f"{row['B x T x H x Hkv x D']} {name}", file=sys.stderr)

        def forward():
            with torch.no_grad():
                return fn(q, k, cos, sin)

        def step():
            outs = fn(qg, kg, cos, sin)
            torch.autograd.grad(outs, leaf, grads)  # no .grad accumulation in the timing

        record(f"{name} fwd", 2 * elements * size, forward)
        record(f"{name} fwd+bwd", 5 * elements * size, step)
        try:
            row[f"{name} diff"] = float((forward()[0].float() - expected).abs().max())
        except Exception:  # its failure is already recorded above
            row[f"{name} diff"] = None
    return row


def _check_against_reference(shape) -> float:
    """max |error| of gptfast's outputs and q, k gradients against the fp64 reference."""
    import gptfast
    from gptfast import reference

    b, t, h, hkv, d = shape
    _, q, k = _inputs(shape, torch.float32, "cpu")
    cos, sin = tables(t, d, "cpu")
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
    with gptfast.use_backend("triton"):
        outs = gptfast.rotary_qk_norm(*leaves, cos, -sin, scale=SCALE)
    ups = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    outs64 = reference.rotary_qk_norm(*leaves64, cos.double(), -sin.double(), SCALE,
                                      torch.finfo(torch.float32).eps)
    grads64 = torch.autograd.grad(outs64, leaves64, [u.double() for u in ups])
    return max(float((got.detach().double() - want.detach()).abs().max())
               for got, want in zip((*outs, *grads), (*outs64, *grads64)))


def _cpu_run() -> int:
    """No CUDA: the same measurement at a tiny shape on the CPU, and a check of gptfast."""
    print("no CUDA device: timing a tiny shape on the CPU (the kernel through the Triton "
          "interpreter; the figures mean nothing) and checking gptfast against the reference.")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    import gptfast

    try:
        with gptfast.use_backend("triton"):
            q = torch.zeros(1, 1, 1, 2)
            gptfast.rotary_qk_norm(q, q, torch.ones(1, 1), torch.zeros(1, 1))
    except gptfast.BackendUnavailable as err:
        print(f"triton backend unavailable here ({err}); skipped")
        return 0
    os.environ.setdefault("GPTFAST_BENCH_COMPILE_BACKEND", "aot_eager")
    impls = implementations()
    row = bench_shape(CPU_SHAPE, torch.float32, impls, device="cpu",
                      meter=Meter("cpu", warmup=10, repeats=20))
    _print_table([row], impls, "CPU")
    err = _check_against_reference(CPU_SHAPE)
    ok = err < 1e-4
    print(f"rotary_qk_norm {'x'.join(map(str, CPU_SHAPE))} fp32 via the interpreter: max abs error "
          f"vs fp64 reference {err:.2e} ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


def _print_table(rows, impls, device_name):
    columns = ["B x T x H x Hkv x D", "dtype", "copy"]
    columns += [f"{name} {kind}" for name in impls for kind in ("fwd", "fwd+bwd")]
    columns += [f"{name} diff" for name in impls if not isinstance(impls[name], str)]
    print(f"\nrotary_qk_norm GB/s on {device_name} (torch {torch.__version__}); diff: "
          f"fwd q' against eager in fp32")
    print(markdown_table(rows, columns))
    for note in sorted({n for r in rows for n in r["notes"]}):
        print(f"- {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.rotary",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                        help=f"comma-separated BxTxHxHkvxD (default {DEFAULT_SHAPES})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return _cpu_run()
    impls = implementations()
    rows = [bench_shape(shape, DTYPES[args.dtype], impls) for shape in args.shapes]
    _print_table(rows, impls, torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
