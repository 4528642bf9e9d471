"""Cross-entropy kernels at the edges of their dtypes, in every launch family.

Inputs: in one batch, rows of logits spread over +-M, rows with one dominant logit (M among
unit noise, and M among -M), all-equal rows (M and -M), and a target that is the largest or
the smallest logit. M is 1e4 in fp32, 6e4 in fp16 (just under its 65504 maximum) and 1e5 in
bf16 (beyond fp16's range, which bf16 exists to cover). Options: plain, label smoothing,
z-loss, softcap, class weights. linear_cross_entropy gets x and W whose products reach the
same magnitudes (fp16: within its range, so no product overflows on either backend).

Families (the launch paths of kernels/cross_entropy.py; there is no autotuning there):
- cross_entropy "keep": the loss kernel in forward, the gradient kernel in backward into a
  new buffer (keep_logits=True); "overwrite": the gradient written into the logits during
  forward, then scaled in backward (keep_logits=False on a non-leaf); "blocks": "overwrite"
  with BLOCK_V forced to 64, so the online logsumexp merges five blocks whose maxima differ
  by up to 2M; "no_grad": forward only.
- linear_cross_entropy "grads_in_forward" ("mean"/"sum": the chunk gradients are made in the
  forward and scaled in backward; fp16 always recomputes) and "recompute" ("none": backward
  recomputes the logits with the upstream gradient folded in), both in chunks of 3 rows.

Tolerance. The oracle is gptfast.reference in fp64 on the same (already rounded) inputs.
Fixed tolerances would be meaningless across magnitudes (a loss of 1e4 computed in fp32 is
only good to about 1e-3), so each output is held to the reference backend's own error in
the same dtype: max|triton - fp64| <= FACTOR * max|reference(dtype) - fp64| + ATOL, with
ATOL = SLACK[dtype] * max|fp64|, a few roundings of the output's dtype (fp32 for losses and
for the fp32 weight gradients of linear CE, the logits' dtype for dlogits). FACTOR is 4: the
kernels round in a different order than torch (online max, exp2 with log2(e) folded in),
which may cost a few ulps more, never orders of magnitude.

bf16 runs through gptfast.testing.enable_interpreter_bf16 (tests/conftest.py turns it on;
Triton's interpreter computes bf16 on bit patterns without it).
"""

import pytest
import torch

import gptfast
from gptfast import reference, testing

ce = pytest.importorskip("gptfast.kernels.cross_entropy")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
MAGNITUDE = {F32: 1e4, F16: 6e4, BF16: 1e5}
FACTOR = 4.0
SLACK = {F32: 8 * 2.0**-24, F16: 4 * 2.0**-11, BF16: 4 * 2.0**-8}
V = 300
OPTIONS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-4),
    "softcap": dict(softcap=50.0),
    "weight": dict(weight=torch.rand(V, dtype=torch.float64) + 0.5, label_smoothing=0.05),
}



def dtype_param(dtype):
    return pytest.param(dtype, id=str(dtype).removeprefix("torch."))


DTYPES = [dtype_param(d) for d in (F32, F16, BF16)]



def edge_logits(dtype):
    """(logits in ``dtype``, int64 targets): one row per pattern of the module docstring."""
    m = MAGNITUDE[dtype]
    noise = torch.randn(9, V)
    rows = [
        (torch.rand(V) * 2 - 1) * m,                                   # spread over +-m
        torch.cat([torch.tensor([m]), noise[1, 1:]]),                  # m among unit noise
        torch.cat([torch.tensor([m]), -m + noise[2, 1:]]),             # m among -m
        torch.full((V,), m),                                           # all equal, large
        torch.full((V,), -m),                                          # all equal, very negative
        -m + noise[5],                                                 # near -m, unit spread
        (torch.rand(V) * 2 - 1) * m,                                   # spread, target smallest
        m - torch.rand(V) * 1e-3 * m,                                  # near m, small spread
        (torch.rand(V) * 2 - 1) * m,                                   # an ignored row
    ]
    logits = torch.stack(rows).to(dtype)
    target = torch.tensor([5, 0, 0, 7, 299, 3, 0, 11, -100])
    target[0] = int(logits[0].float().argmax())
    target[6] = int(logits[6].float().argmin())
    return logits, target


def upstream(reduction, rows):
    return torch.rand(rows) + 0.5 if reduction == "none" else torch.tensor(1.3)


def assert_within_reference_error(name, got, ref, exact, dtype):
    testing.assert_within_reference_error(name, got, ref, exact, SLACK[dtype], FACTOR)


def _ce_options(option, dtype):
    options = dict(OPTIONS[option])
    if "weight" in options:
        options["weight"] = options["weight"].to(dtype if dtype == torch.float64 else F32)
    return options


def _ce_run(backend, logits, target, grad, reduction, option, family=None):
    """(loss, dlogits or None) through the public op on ``backend``."""
    options = _ce_options(option, logits.dtype)
    leaf = logits.detach().clone().requires_grad_(family != "no_grad")
    rows = leaf * 1  # a non-leaf made by an op: keep_logits=False may overwrite it
    with gptfast.use_backend(backend):
        loss = gptfast.cross_entropy(rows, target, reduction=reduction,
                                     keep_logits=family != "overwrite" and family != "blocks",
                                     **options)
    if family == "no_grad":
        return loss, None
    (dlogits,) = torch.autograd.grad(loss, leaf, grad.to(loss.dtype))
    return loss, dlogits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("family", ["keep", "overwrite", "blocks", "no_grad"])
def test_cross_entropy_at_the_edges(monkeypatch, dtype, option, family):
    if family == "blocks":
        monkeypatch.setattr(ce, "_launch_config", lambda vocab, element_size: (64, 4))
    # "mean" on the in-place path: fp16 stores the gradient unscaled, bf16/fp32 fold 1/count
    reduction = {"keep": "none", "overwrite": "mean", "blocks": "sum", "no_grad": "mean"}[family]
    logits, target = edge_logits(dtype)
    grad = upstream(reduction, len(target))
    exact, exact_grad = _ce_run("reference", logits.double(), target, grad.double(), reduction,
                                option, "keep")
    if family == "no_grad":
        exact_grad = None
    ref_loss, ref_grad = _ce_run("reference", logits, target, grad, reduction, option, family)
    got_loss, got_grad = _ce_run("triton", logits, target, grad, reduction, option, family)
    assert got_loss.dtype == F32 and got_loss.shape == exact.shape
    assert torch.isfinite(got_loss).all()
    assert_within_reference_error("loss", got_loss, ref_loss, exact, F32)
    if exact_grad is not None:
        assert got_grad.dtype == dtype and torch.isfinite(got_grad).all()
        assert (got_grad[-1] == 0).all()  # the ignored row
        assert_within_reference_error("dlogits", got_grad, ref_grad, exact_grad, dtype)


# ---------------------------------------------------------------- linear cross-entropy --

C = 16


def edge_linear(dtype):
    """x (8, C) and W (V, C) whose products reach about MAGNITUDE[dtype] / 2, with a dominant
    row (x aligned with one row of W) and an all-zero row of x."""
    m = MAGNITUDE[dtype]
    a = (m / 32) ** 0.5  # std of x and W entries: logits ~ N(0, (a^2 sqrt(C))^2) = N(0, (m/8)^2)
    x = torch.randn(8, C) * a
    weight = torch.randn(V, C) * a
    x[1] = weight[17] * (m / 2) / weight[17].square().sum()  # logit 17 of row 1 is m / 2
    x[2] = 0.0                                                # all logits equal (0)
    target = torch.randint(0, V, (8,))
    target[1], target[5] = 17, -100
    return x.to(dtype), weight.to(dtype), target


def _linear_run(backend, x, weight, target, grad, reduction, option):
    options = _ce_options(option, x.dtype)
    ce_weight = options.pop("weight", None)
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with gptfast.use_backend(backend):
        loss = gptfast.linear_cross_entropy(x, weight, target, reduction=reduction,
                                            ce_weight=ce_weight, **options)
    return (loss, *torch.autograd.grad(loss, (x, weight), grad.to(loss.dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("family", ["grads_in_forward", "recompute"])
def test_linear_cross_entropy_at_the_edges(monkeypatch, dtype, option, family):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 3)
    reduction = "mean" if family == "grads_in_forward" else "none"
    x, weight, target = edge_linear(dtype)
    grad = upstream(reduction, len(target))
    exact = _linear_run("reference", x.double(), weight.double(), target, grad.double(),
                        reduction, option)
    ref = _linear_run("reference", x, weight, target, grad, reduction, option)
    got = _linear_run("triton", x, weight, target, grad, reduction, option)
    for name, g, r, e in zip(("loss", "dx", "dweight"), got, ref, exact):
        assert torch.isfinite(g).all(), name
        assert_within_reference_error(name, g, r, e, F32 if name == "loss" else dtype)
