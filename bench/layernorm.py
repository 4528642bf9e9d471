"""LayerNorm and RMSNorm bandwidth: gptfast's Triton kernels against torch eager, torch.compile
and Liger.

    python -m gptfast.bench.layernorm [--op layer_norm|rms_norm|add_rms_norm]
                                      [--dtype fp32|bf16] [--param-dtype fp32|same]
                                      [--sizes 16384x768,65536x768,16384x4096,8192x8192]

Prints one markdown table of GB/s (bytes moved / median time), every implementation and
the device-to-device copy ceiling measured in the same run. Bytes are counted as in
bench/ANCHORS.md:
    fwd      = read x + write y + read w, b
    fwd+bwd  = fwd + read x, dy + write dx + write dw, db
so the fwd+bwd figure is comparable across implementations that move more than that.
rms_norm has a weight and no bias (F.rms_norm, Liger's LigerRMSNormFunction);
add_rms_norm(x, r) also reads r and writes s = x + r forward, and reads the gradient of s
backward (dx = dr, one write), against ``s = x + r; F.rms_norm(s)`` eager and compiled and
Liger's LigerFusedAddRMSNormFunction. Liger's columns are left out, with the reason printed
(and, in the kernels suite, an "n/a" row), when liger_kernel does not import.
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

from .common import DTYPES, Measured, Meter, compiled, markdown_table, parse_pairs

DEFAULT_SIZES = "16384x768,65536x768,16384x4096,8192x8192"
EPS = 1e-5
# per op: its parameters (all of length C) and whether it adds a residual stream
OPS = {"layer_norm": (("w", "b"), False), "rms_norm": (("w",), False),
       "add_rms_norm": (("w",), True),
       "rms_norm_no_weight": ((), False)}  # nanochat's norm: no weight, the dtype's eps


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return parse_pairs(text, example="16384x768")


def _liger(op: str):
    """Liger's autograd function for ``op`` (positional: eps, offset 0, llama casting, not in
    place); raises ImportError when liger_kernel, or this op in it, does not import."""
    if op == "rms_norm_no_weight":
        raise ImportError("Liger's RMSNorm always takes a weight")
    if op == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    if op == "rms_norm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    return lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)


def liger_unavailable(op: str = "layer_norm") -> str | None:
    """Why there is no Liger column for ``op`` (its import fails), or None."""
    try:
        _liger(op)
    except Exception as err:  # noqa: BLE001 - any import failure means no Liger column
        return f"liger_kernel unavailable ({type(err).__name__}: {err})"
    return None


def _torch_ops(op: str):
    """(gptfast's op, torch's eager equivalent) for ``op``, same arguments."""
    import gptfast

    F = torch.nn.functional
    if op == "layer_norm":
        return (lambda x, w, b: gptfast.layer_norm(x, w, b, EPS),
                lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS))
    if op == "rms_norm_no_weight":
        return gptfast.rms_norm, lambda x: F.rms_norm(x, (x.shape[-1],))
    if op == "rms_norm":
        return (lambda x, w: gptfast.rms_norm(x, w, EPS),
                lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS))

    def add_rms_norm(x, r, w):
        s = x + r
        return F.rms_norm(s, (s.shape[-1],), w, EPS), s

    return lambda x, r, w: gptfast.add_rms_norm(x, r, w, EPS), add_rms_norm


def implementations(param_dtype_is_x: bool, op: str = "layer_norm"):
    import gptfast

    ours_op, eager = _torch_ops(op)

    def ours(*args):
        with gptfast.use_backend("triton"):
            return ours_op(*args)

    impls = {"gptfast": (ours, not param_dtype_is_x), "eager": (eager, False),
             "compile": (compiled(eager, dynamic=False), False)}
    if liger_unavailable(op) is None:
        impls["liger"] = (_liger(op), False)
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
               meter: Meter | None = None, op: str = "layer_norm") -> dict:
    """One row of GB/s per implementation and pass, and the copy; ``row["measured"]`` holds
    each cell's Measured and ``row["bytes"]`` the bytes it counts. ``impls`` are
    :func:`implementations` of the same ``op``."""
    meter = meter or Meter(device)
    param_names, has_residual = OPS[op]
    act = torch.empty(0, dtype=dtype).element_size()
    x = torch.randn(n, c, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    residual = torch.randn_like(x) if has_residual else None
    # activations streamed: fwd reads x (and r), writes y (and s); bwd reads x or s, dy
    # (and ds) and writes dx (= dr)
    fwd_streams, bwd_streams = (4, 4) if has_residual else (2, 3)
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
        params = [torch.randn(c, device=device, dtype=p_dtype, requires_grad=True)
                  for _ in param_names]
        inputs = [x] if residual is None else [x, residual]
        leaves = [t.detach().requires_grad_() for t in inputs]
        fwd_bytes = fwd_streams * x.numel() * act + len(params) * c * p_size
        bwd_bytes = bwd_streams * x.numel() * act + len(params) * c * p_size
        print(f"{n}x{c} {op} {name}", file=sys.stderr)

        def forward():
            with torch.no_grad():
                fn(*inputs, *params)

        def step():
            out = fn(*leaves, *params)
            outs = out if isinstance(out, tuple) else (out,)
            # no .grad accumulation in the timing
            torch.autograd.grad(outs, (*leaves, *params), (dy,) * len(outs))

        record(f"{name} fwd", fwd_bytes, forward)
        record(f"{name} fwd+bwd", fwd_bytes + bwd_bytes, step)
    return row


def _cpu_sanity(op: str = "layer_norm") -> int:
    """No CUDA: run one tiny case of ``op`` through the interpreter against the reference."""
    print("no CUDA device: nothing to time. Running a tiny sanity check on CPU "
          "(Triton interpreter) instead.")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    import gptfast
    from gptfast import reference

    param_names, has_residual = OPS[op]
    leaves = [torch.randn(4, 100) for _ in range(2 if has_residual else 1)]
    leaves += [torch.randn(100) for _ in param_names]
    leaves = [t.requires_grad_() for t in leaves]
    ours_op, _ = _torch_ops(op)
    try:
        with gptfast.use_backend("triton"):
            out = ours_op(*leaves)
    except gptfast.BackendUnavailable as err:
        print(f"triton backend unavailable here ({err}); skipped")
        return 0
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    if op == "rms_norm_no_weight":  # torch's eps: the dtype's
        out64 = reference.rms_norm(*leaves64)
    else:
        out64 = getattr(reference, op)(*leaves64, EPS)
    outs, outs64 = (o if isinstance(o, tuple) else (o,) for o in (out, out64))
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.autograd.backward(outs64, [torch.ones_like(o) for o in outs64])
    pairs = list(zip(outs, outs64)) + [(t.grad, t64.grad) for t, t64 in zip(leaves, leaves64)]
    err = max(float((got.detach().double() - want.detach()).abs().max()) for got, want in pairs)
    ok = err < 1e-4
    print(f"{op} 4x100 fp32 via the interpreter: max abs error vs fp64 reference {err:.2e}"
          f" ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.layernorm", description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=list(OPS), default="layer_norm", help="the norm to time")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="activation dtype")
    parser.add_argument("--param-dtype", choices=["fp32", "same"], default="fp32",
                        help="gptfast's weight/bias dtype: fp32, or the activation dtype")
    parser.add_argument("--sizes", type=_parse_sizes, default=_parse_sizes(DEFAULT_SIZES),
                        help=f"comma-separated NxC (default {DEFAULT_SIZES})")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        return _cpu_sanity(args.op)

    dtype = DTYPES[args.dtype]
    param_fp32 = args.param_dtype == "fp32"
    impls = implementations(param_dtype_is_x=not param_fp32, op=args.op)
    rows = [bench_size(n, c, dtype, impls, op=args.op) for n, c in args.sizes]
    columns = ["N x C", "dtype", "copy"] + [f"{name} {kind}" for name in impls for kind in ("fwd", "fwd+bwd")]
    print(f"\n{args.op} GB/s on {torch.cuda.get_device_name()} (torch {torch.__version__}); "
          f"gptfast params {'fp32' if param_fp32 else args.dtype}, baselines' params {args.dtype}")
    print(markdown_table(rows, columns))
    missing = liger_unavailable(args.op)
    if missing:
        print(f"\nliger: unavailable, {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
