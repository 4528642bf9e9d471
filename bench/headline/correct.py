"""The ``correct`` stage of ``gptfast bench --suite headline``: every kernel at its headline
shape, forward and backward, against the reference ops in fp32 on upcast copies of the inputs.

Each output and gradient is one row: ``rel_err`` = ||ours - reference|| / ||reference|| (NaN or
Inf in ours: infinite), with the max abs error beside it, pass/fail against the tolerance of the
dtype (bf16 operands land between 1e-3 and 1e-2; fp16 has 3 more mantissa bits; fp32 runs in
the CPU dry run, through the Triton interpreter). Inputs are fresh random draws per case.
The first dtype of the sizes runs every case, the others the first case of each op.
"""

from __future__ import annotations

import contextlib
import time

import torch

import gptfast

from ..common import DTYPES, relative_error
from .report import row
from .stages import Context, Unit

TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
IGNORE_EVERY = 50  # every 50th target is ignore_index, as padding would be


def compare(case: str, dtype_name: str, outputs: dict, seconds: float, shape: str) -> list:
    """One row per output: rel_err (and max abs error) of ours against the reference."""
    tolerance = TOLERANCE[dtype_name]
    rows = []
    for output, (ours, reference) in outputs.items():
        if ours.shape != reference.shape:
            rows.append(row("correct", f"{case} {output}", "gptfast", "rel_err", None, "",
                            shape=shape, status="fail", dtype=dtype_name, tolerance=tolerance,
                            message=f"shape {tuple(ours.shape)} != {tuple(reference.shape)}"))
            continue
        rel, max_abs = relative_error(ours, reference)
        rows.append(row("correct", f"{case} {output}", "gptfast", "rel_err", rel, "",
                        shape=shape, status="ok" if rel <= tolerance else "fail",
                        dtype=dtype_name, tolerance=tolerance, max_abs_err=max_abs,
                        seconds=seconds, message=None if rel <= tolerance else
                        f"rel_err {rel:.3g} > {tolerance:g}"))
    return rows


def check(case, dtype_name, shape, fn, inputs, grad_outputs, names) -> list:
    """Run ``fn(*inputs)`` forward and backward (``grad_outputs`` for its outputs) on the triton
    backend, then on the reference backend in fp32 with upcast copies of the inputs, and compare
    its outputs and the gradients of every input; ``names`` names outputs then inputs."""
    def run(backend, tensors):
        with gptfast.use_backend(backend):
            out = fn(*tensors)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs, tensors, [g.to(o.dtype) for o, g in
                                                    zip(outs, grad_outputs)])
        return [o.detach() for o in outs] + list(grads)

    start = time.perf_counter()
    ours = run("triton", [t.detach().clone().requires_grad_() for t in inputs])
    seconds = time.perf_counter() - start
    reference = run("reference", [t.detach().float().requires_grad_() for t in inputs])
    return compare(case, dtype_name, dict(zip(names, zip(ours, reference))), seconds, shape)


@contextlib.contextmanager
def atomic_dq(enabled: bool):
    from gptfast.kernels import attention

    previous = attention.set_atomic_dq(enabled)
    try:
        yield
    finally:
        attention.set_atomic_dq(previous)


def attention_case(ctx: Context, dtype_name, label, batch, heads, kv_heads, seq, head_dim,
                   atomic) -> list:
    dtype, device = DTYPES[dtype_name], ctx.device
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype)
            for _ in range(2))
    with atomic_dq(atomic):
        return check(f"causal_attention {dtype_name} {label}", dtype_name,
                     f"B{batch} H{heads} Hkv{kv_heads} T{seq} D{head_dim}",
                     gptfast.causal_attention, (q, k, v), (torch.randn_like(q),),
                     ("out", "dq", "dk", "dv"))


def layer_norm_case(ctx: Context, dtype_name, params, residual) -> list:
    """layer_norm (or add_layer_norm) of (N, C) x in dtype with ``params`` "fp32" or "same"."""
    n, c = ctx.sizes.correct_norm_rows
    dtype, device = DTYPES[dtype_name], ctx.device
    param_dtype = torch.float32 if params == "fp32" else dtype
    x = torch.randn(n, c, device=device, dtype=dtype)
    w = 1 + 0.1 * torch.randn(c, device=device, dtype=param_dtype)
    b = 0.1 * torch.randn(c, device=device, dtype=param_dtype)
    label = f"{dtype_name} x, {params if params == 'fp32' else dtype_name} params"
    if residual:
        r = torch.randn(n, c, device=device, dtype=dtype)
        return check(f"add_layer_norm {label}", dtype_name, f"{n}x{c}", gptfast.add_layer_norm,
                     (x, r, w, b), (torch.randn_like(x), torch.randn_like(x)),
                     ("out", "sum", "dx", "dresidual", "dweight", "dbias"))
    return check(f"layer_norm {label}", dtype_name, f"{n}x{c}", gptfast.layer_norm, (x, w, b),
                 (torch.randn_like(x),), ("out", "dx", "dweight", "dbias"))


def _target(rows, vocab, device, ignore):
    target = torch.randint(0, vocab, (rows,), device=device)
    if ignore:
        target[::IGNORE_EVERY] = -100
    return target


CE_OPTIONS = {"plain": {}, "ignore_index": {}, "label_smoothing 0.1": {"label_smoothing": 0.1},
              "z_loss 1e-4": {"z_loss": 1e-4}}


def cross_entropy_case(ctx: Context, dtype_name, option) -> list:
    n, v = ctx.sizes.ce_rows, ctx.sizes.vocab
    logits = (2 * torch.randn(n, v, device=ctx.device)).to(DTYPES[dtype_name])
    target = _target(n, v, ctx.device, ignore=option != "plain")
    options = CE_OPTIONS[option]
    return check(f"cross_entropy {dtype_name} {option}", dtype_name, f"{n}x{v}",
                 lambda lg: gptfast.cross_entropy(lg, target, **options), (logits,),
                 (torch.ones((), device=ctx.device),), ("loss", "dlogits"))


def linear_cross_entropy_case(ctx: Context, dtype_name) -> list:
    n, c, v = ctx.sizes.ce_rows, ctx.sizes.hidden, ctx.sizes.vocab
    dtype = DTYPES[dtype_name]
    x = torch.randn(n, c, device=ctx.device, dtype=dtype)
    w = (torch.randn(v, c, device=ctx.device) / c ** 0.5).to(dtype)
    target = _target(n, v, ctx.device, ignore=True)
    return check(f"linear_cross_entropy {dtype_name} ignore_index", dtype_name,
                 f"{n}x{c} @ {v}x{c}", lambda a, b: gptfast.linear_cross_entropy(a, b, target),
                 (x, w), (torch.ones((), device=ctx.device),), ("loss", "dx", "dweight"))


def gpt_case(ctx: Context) -> list:
    """GPT loss and a few gradients, the same weights and batch, triton vs reference backend;
    bf16 autocast on CUDA, fp32 in the dry run (bf16 tl.dot is wrong in the interpreter)."""
    from gptfast.model import GPT, GPTConfig

    model_name, batch, seq = ctx.sizes.correct_gpt
    if model_name == "tiny":
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=256, block_size=seq)
    else:
        config = GPTConfig.preset(model_name, vocab_size=50304)
    torch.manual_seed(0)
    with ctx.device:
        model = GPT(config)
    tokens = torch.randint(config.vocab_size, (batch, seq + 1), device=ctx.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    dtype_name = "bf16" if ctx.meter.cuda else "fp32"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.meter.cuda
                else contextlib.nullcontext())
    watched = {"dwte": model.transformer.wte.weight,
               "dc_attn[0]": model.transformer.h[0].attn.c_attn.weight,
               "dc_fc[-1]": model.transformer.h[-1].mlp.c_fc.weight}

    def loss_and_grads(backend):
        model.zero_grad(set_to_none=True)
        with gptfast.use_backend(backend), autocast:
            _, loss = model(x, y, return_logits=False)
        loss.backward()
        return [loss.detach()] + [p.grad.detach().clone() for p in watched.values()]

    start = time.perf_counter()
    ours = loss_and_grads("triton")
    seconds = time.perf_counter() - start
    reference = loss_and_grads("reference")
    names = ["loss", *watched]
    return compare(f"GPT {model_name} loss {dtype_name} autocast" if ctx.meter.cuda
                   else f"GPT {model_name} loss fp32", dtype_name,
                   dict(zip(names, zip(ours, reference))), seconds, f"B{batch} T{seq}")


def correct_units(ctx: Context) -> list:
    first, *others = ctx.sizes.correct_dtypes
    units = []
    for dtype_name in ctx.sizes.correct_dtypes:
        cases = ctx.sizes.correct_attention
        cases = cases if dtype_name == first else cases[:1]
        units += [Unit(f"attention {dtype_name} {case[0]}",
                       lambda d=dtype_name, c=case: attention_case(ctx, d, *c), 20)
                  for case in cases]
    for dtype_name in ctx.sizes.correct_dtypes:
        combos = ([("fp32", False), ("same", False), ("fp32", True)] if dtype_name == first
                  else [("fp32", False)])
        units += [Unit(f"layer_norm {dtype_name} params {p}{' residual' if r else ''}",
                       lambda d=dtype_name, p=p, r=r: layer_norm_case(ctx, d, p, r), 5)
                  for p, r in combos]
    for dtype_name in ctx.sizes.correct_dtypes:
        options = list(CE_OPTIONS) if dtype_name == first else ["plain"]
        units += [Unit(f"cross_entropy {dtype_name} {o}",
                       lambda d=dtype_name, o=o: cross_entropy_case(ctx, d, o), 5)
                  for o in options]
    units += [Unit(f"linear_cross_entropy {d}", lambda d=d: linear_cross_entropy_case(ctx, d), 8)
              for d in ctx.sizes.correct_dtypes]
    units.append(Unit("GPT loss triton vs reference", lambda: gpt_case(ctx), 15))
    return units
