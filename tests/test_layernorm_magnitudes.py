"""LayerNorm kernels at the edges of their dtypes: large means with tiny spreads.

Rows, by dtype, as (mean, spread) pairs; each dtype's extreme is where its spacing (ulp) at
the mean is about the spread, so that a row still holds a few distinct values and its
variance is all cancellation:
- fp32: (1e4, 1e-4) (ulp(1e4) = 1e-3: the stored row is 1e4 plus a few ulps, variance far
  below eps), (1e4, 1e-2), (-1e4, 1), and a unit row;
- fp16: (1e3, 1) (ulp 0.5), (3e4, 50) (ulp 16, near its 65504 maximum), (-1e3, 1), unit;
- bf16: (1e4, 256) (ulp 64), (1e15, 1e13) (beyond fp16's range, variance still finite in
  fp32), (-1e4, 256), unit.
add_layer_norm gets the large-mean rows as the residual stream and unit noise as x (and, for
fp16/bf16, an fp32 residual stream: the sum is fp32 and dx comes back in two dtypes).

Families (kernels/layernorm.py has no autotuning; the paths are chosen by row length):
"fused" (rows in registers, forward and backward), "looped" (chunked Chan statistics in the
forward, two-pass chunked backward; forced with small MAX_FUSED_C / MAX_FUSED_BWD_C as in
tests/test_layernorm.py), "looped_backward" (fused forward, looped backward). Outputs: y (and
s), dx (and dresidual), dweight, dbias.

Tolerance, as tests/test_cross_entropy_magnitudes.py: the oracle is gptfast.reference in
fp64 on the same rounded inputs, and each output must satisfy
max|triton - fp64| <= FACTOR * max|reference(dtype) - fp64| + SLACK[dtype] * max|fp64|:
within a few times the reference backend's own error in that dtype, plus a few roundings of
the output dtype (gptfast.testing.assert_within_reference_error). bf16 runs through
gptfast.testing.enable_interpreter_bf16, which tests/conftest.py turns on.
"""

import pytest
import torch

import gptfast
from gptfast import reference, testing

ln = pytest.importorskip("gptfast.kernels.layernorm")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FACTOR = 4.0
SLACK = {F32: 8 * 2.0**-24, F16: 4 * 2.0**-11, BF16: 4 * 2.0**-8}
ROWS = {
    F32: [(1e4, 1e-4), (1e4, 1e-2), (-1e4, 1.0), (0.0, 1.0)],
    F16: [(1e3, 1.0), (3e4, 50.0), (-1e3, 1.0), (0.0, 1.0)],
    BF16: [(1e4, 256.0), (1e15, 1e13), (-1e4, 256.0), (0.0, 1.0)],
}
C = 700  # not a power of two; above the forced loop thresholds below



def dtype_param(dtype):
    return pytest.param(dtype, id=str(dtype).removeprefix("torch."))



def edge_rows(dtype):
    """(len(ROWS[dtype]), C) rows of the given means and spreads, rounded to ``dtype``."""
    rows = [mean + spread * torch.randn(C, dtype=torch.float64) for mean, spread in ROWS[dtype]]
    return torch.stack(rows).to(dtype)


def force(monkeypatch, family):
    if family == "looped":
        monkeypatch.setattr(ln, "MAX_FUSED_C", 512)
        monkeypatch.setattr(ln, "LOOP_BLOCK_C", 256)
    if family in ("looped", "looped_backward"):
        monkeypatch.setattr(ln, "MAX_FUSED_BWD_C", 512)
        monkeypatch.setattr(ln, "LOOP_BWD_BLOCK_C", 256)


def assert_within_reference_error(name, got, ref, exact, dtype):
    testing.assert_within_reference_error(name, got, ref, exact, SLACK[dtype], FACTOR)


def _run(backend, op, inputs, upstream):
    """Outputs and gradients of ``op`` on ``backend``: [y, (s), dx, (dr), dw, db]."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with gptfast.use_backend(backend):
        if op == "layer_norm":
            x, w, b = leaves
            outs = [gptfast.layer_norm(x, w, b)]
        else:
            x, r, w, b = leaves
            outs = list(gptfast.add_layer_norm(x, r, w, b))
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    return outs + list(torch.autograd.grad(total, leaves))


def _exact_add_layer_norm(inputs, upstream):
    """The fp64 oracle of add_layer_norm on the sum as both backends store it: x + residual
    rounded once to the sum's dtype (the kernel adds in fp32, exact for these inputs, then
    rounds), so that the oracle normalises the very row the kernels see."""
    x, residual, weight, bias = inputs
    stored = (x.double() + residual.double()).to(torch.promote_types(x.dtype, residual.dtype))
    s, w, b = (t.double().requires_grad_() for t in (stored, weight, bias))
    y = reference.layer_norm(s, w, b)
    total = (y * upstream[0]).sum() + (s * upstream[1]).sum()
    ds, dw, db = torch.autograd.grad(total, (s, w, b))
    return [y, s, ds, ds, dw, db]  # d/dx = d/dresidual = d/ds


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in (F32, F16, BF16)])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "add_layer_norm_fp32_stream"])
@pytest.mark.parametrize("family", ["fused", "looped", "looped_backward"])
def test_layer_norm_at_the_edges(monkeypatch, dtype, op, family):
    if op == "add_layer_norm_fp32_stream" and dtype == F32:
        pytest.skip("the fp32 stream is the plain add_layer_norm case in fp32")
    force(monkeypatch, family)
    big = edge_rows(dtype)
    weight, bias = torch.randn(C).to(dtype), torch.randn(C).to(dtype)
    if op == "layer_norm":
        inputs, names = [big, weight, bias], ["y", "dx", "dweight", "dbias"]
    else:
        residual = big.float() if op == "add_layer_norm_fp32_stream" else big
        inputs = [torch.randn(big.shape).to(dtype), residual, weight, bias]
        names = ["y", "s", "dx", "dresidual", "dweight", "dbias"]
    n_outputs = 1 if op == "layer_norm" else 2
    upstream = [torch.randn(big.shape, dtype=torch.float64) for _ in range(n_outputs)]
    exact = (_run("reference", op, [t.double() for t in inputs], upstream)
             if op == "layer_norm" else _exact_add_layer_norm(inputs, upstream))
    ref = _run("reference", op, inputs, upstream)
    got = _run("triton", op, inputs, upstream)
    for name, g, r, e in zip(names, got, ref, exact):
        assert g.dtype == r.dtype and g.shape == e.shape, name
        assert torch.isfinite(g).all(), name
        assert_within_reference_error(name, g, r, e, g.dtype)
