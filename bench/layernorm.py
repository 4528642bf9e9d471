"""LayerNorm bandwidth: gptfast's Triton kernels against torch eager, torch.compile and Liger.

    python -m gptfast.bench.layernorm [--dtype fp32|bf16] [--param-dtype fp32|same]
                                      [--sizes 16384x768,65536x768,16384x4096,8192x8192]

Prints one markdown table of GB/s (bytes moved / median time), every implementation and
the device-to-device copy ceiling measured in the same run. Bytes are counted as in
bench/ANCHORS.md:
    fwd      = read x + write y + read w, b
    fwd+bwd  = fwd + read x, dy + write dx + write dw, db
so the fwd+bwd figure is comparable across implementations that move more than that.
The copy column is ``dst.copy_(src)`` of the N x C activations (read + write bytes / time).

torch eager rejects bf16 x with fp32 weights, so the eager, compile and Liger baselines
use weights in x's dtype; gptfast uses ``--param-dtype`` (fp32 by default, as with mixed
precision training). Without CUDA the script says so, runs a tiny shape through the
Triton interpreter as a sanity check and exits 0 (interpreter timings mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

from .common import Measured, Meter, compiled, markdown_table, parse_pairs

DEFAULT_SIZES = "16384x768,65536x768,16384x4096,8192x8192"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-5


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return parse_pairs(text, example="16384x768")


def _liger():
    """Liger's LayerNorm autograd function, or None when liger_kernel does not import."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception:
        return None
    return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)


def implementations(param_dtype_is_x: bool):
    import gptfast

    def ours(x, w, b):
        with gptfast.use_backend("triton"):
            return gptfast.layer_norm(x, w, b, EPS)

    def eager(x, w, b):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, EPS)

    impls = {"gptfast": (ours, not param_dtype_is_x), "eager": (eager, False),
             "compile": (compiled(eager, dynamic=False), False)}
    liger = _liger()
    if liger is not None:
        impls["liger"] = (liger, False)
    return impls  # name -> (fn, params in fp32 rather than x's dtype)


def _gbps(nbytes: int, ms: float | None) -> float | None:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def _measure(fn, meter, label) -> Measured:
    """The Measured of fn; a failure or OOM is reported on stderr and kept, not raised."""
    measured = meter.measure(fn)
    if measured.status != "ok":  # a baseline that cannot run this case is a '-' in the table
        print(f"  {label}: {measured.status}: {measured.error}", file=sys.stderr)
    return measured


def bench_size(n: int, c: int, dtype: torch.dtype, impls, device: str = "cuda",
               meter: Meter | None = None) -> dict:
    """One row of GB/s per implementation and pass, and the copy; ``row["measured"]`` holds
    each cell's Measured and ``row["bytes"]`` the bytes it counts."""
    meter = meter or Meter(device)
    act = torch.empty(0, dtype=dtype).element_size()
    x = torch.randn(n, c, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    row = {"N x C": f"{n} x {c}", "dtype": str(dtype).replace("torch.", ""), "measured": {},
           "bytes": {}}

    def record(column, nbytes, fn):
        measured = row["measured"][column] = _measure(fn, meter, f"{n}x{c} {column}")
        row["bytes"][column] = nbytes
        row[column] = _gbps(nbytes, measured.ms)

    dst = torch.empty_like(x)
    record("copy", 2 * x.numel() * act, functools.partial(dst.copy_, x))
    del dst  # freed before the implementations run

    for name, (fn, fp32_params) in impls.items():
        p_dtype = torch.float32 if fp32_params else dtype
        p_size = torch.empty(0, dtype=p_dtype).element_size()
        w = torch.randn(c, device=device, dtype=p_dtype, requires_grad=True)
        b = torch.randn(c, device=device, dtype=p_dtype, requires_grad=True)
        xg = x.detach().requires_grad_()
        fwd_bytes = 2 * x.numel() * act + 2 * c * p_size
        bwd_bytes = 3 * x.numel() * act + 2 * c * p_size
        print(f"{n}x{c} {name}", file=sys.stderr)

        def forward():
            with torch.no_grad():
                fn(x, w, b)

        def step():
            y = fn(xg, w, b)
            torch.autograd.grad(y, (xg, w, b), dy)  # no .grad accumulation in the timing

        record(f"{name} fwd", fwd_bytes, forward)
        record(f"{name} fwd+bwd", fwd_bytes + bwd_bytes, step)
    return row


def _cpu_sanity() -> int:
    """No CUDA: run one tiny case through the interpreter against the reference."""
    print("no CUDA device: nothing to time. Running a tiny sanity check on CPU "
          "(Triton interpreter) instead.")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    import gptfast
    from gptfast import reference

    x = torch.randn(4, 100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    try:
        with gptfast.use_backend("triton"):
            y = gptfast.layer_norm(x, w, b, EPS)
    except gptfast.BackendUnavailable as err:
        print(f"triton backend unavailable here ({err}); skipped")
        return 0
    y.backward(torch.ones_like(y))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = reference.layer_norm(x64, w64, b64, EPS)
    y64.backward(torch.ones_like(y64))
    y, y64 = y.detach(), y64.detach()
    err = max(float((y.double() - y64).abs().max()), float((x.grad.double() - x64.grad).abs().max()),
              float((w.grad.double() - w64.grad).abs().max()))
    ok = err < 1e-4
    print(f"layer_norm 4x100 fp32 via the interpreter: max abs error vs fp64 reference {err:.2e}"
          f" ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.layernorm", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="activation dtype")
    parser.add_argument("--param-dtype", choices=["fp32", "same"], default="fp32",
                        help="gptfast's weight/bias dtype: fp32, or the activation dtype")
    parser.add_argument("--sizes", type=_parse_sizes, default=_parse_sizes(DEFAULT_SIZES),
                        help=f"comma-separated NxC (default {DEFAULT_SIZES})")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        return _cpu_sanity()

    dtype = DTYPES[args.dtype]
    param_fp32 = args.param_dtype == "fp32"
    impls = implementations(param_dtype_is_x=not param_fp32)
    rows = [bench_size(n, c, dtype, impls) for n, c in args.sizes]
    columns = ["N x C", "dtype", "copy"] + [f"{name} {kind}" for name in impls for kind in ("fwd", "fwd+bwd")]
    print(f"\nLayerNorm GB/s on {torch.cuda.get_device_name()} (torch {torch.__version__}); "
          f"gptfast params {'fp32' if param_fp32 else args.dtype}, baselines' params {args.dtype}")
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
