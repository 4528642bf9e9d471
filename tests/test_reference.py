"""gptfast.reference against direct PyTorch formulas in fp64, plus gradchecks.

These ops are the oracle every kernel is tested against, so they are checked here against
independent formulas (torch's own functional ops, or the maths written out).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from gptfast import reference

f64 = torch.float64


def rand(*shape, dtype=f64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


# --------------------------------------------------------------------------- layer norm --

@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 33), (1, 1)])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_matches_formula(shape, affine):
    x = rand(*shape)
    c = shape[-1]
    weight = rand(c) if affine != "none" else None
    bias = rand(c) if affine == "weight+bias" else None
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    if weight is not None:
        expected = expected * weight
    if bias is not None:
        expected = expected + bias
    torch.testing.assert_close(reference.layer_norm(x, weight, bias), expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_mixed_dtypes_return_activation_dtype():
    x = torch.randn(4, 16, dtype=torch.float16)
    weight, bias = torch.randn(16), torch.randn(16)  # fp32 params, as under autocast
    out = reference.layer_norm(x, weight, bias)
    assert out.dtype == torch.float16
    expected = F.layer_norm(x.double(), (16,), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)


def test_add_layer_norm_returns_norm_of_sum_and_sum():
    x, residual, weight, bias = rand(3, 9), rand(3, 9), rand(9), rand(9)
    normed, total = reference.add_layer_norm(x, residual, weight, bias, eps=1e-6)
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.layer_norm(x + residual, (9,), weight, bias, 1e-6))


def test_add_layer_norm_promotes_half_branch_into_fp32_stream():
    branch = torch.randn(2, 8, dtype=torch.bfloat16)
    stream = torch.randn(2, 8)
    normed, total = reference.add_layer_norm(branch, stream)
    assert total.dtype == normed.dtype == torch.float32


def test_layer_norm_gradcheck():
    x, weight, bias = rand(3, 6, requires_grad=True), rand(6, requires_grad=True), rand(6, requires_grad=True)
    assert gradcheck(lambda *a: reference.layer_norm(*a), (x, weight, bias))
    residual = rand(3, 6, requires_grad=True)
    assert gradcheck(lambda *a: reference.add_layer_norm(*a), (x, residual, weight, bias))


# ---------------------------------------------------------------------------- attention --

def attention_by_loops(q, k, v, scale):
    """Causal attention one query row at a time, with kv head h // groups for query head h."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kv = hi // groups
            for i in range(t):
                scores = (k[bi, kv, : i + 1] @ q[bi, hi, i]) * scale
                out[bi, hi, i] = torch.softmax(scores, 0) @ v[bi, kv, : i + 1]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2), (4, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_causal_attention_matches_loops(heads, kv_heads, scale):
    q = rand(2, heads, 7, 5)
    k, v = rand(2, kv_heads, 7, 5), rand(2, kv_heads, 7, 5)
    expected = attention_by_loops(q, k, v, 5 ** -0.5 if scale is None else scale)
    torch.testing.assert_close(reference.causal_attention(q, k, v, scale), expected)
    torch.testing.assert_close(reference.causal_attention_math(q, k, v, scale), expected)


def test_causal_attention_first_row_sees_only_first_key():
    q, k, v = rand(1, 2, 4, 3), rand(1, 2, 4, 3), rand(1, 2, 4, 3)
    out = reference.causal_attention(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


def test_causal_attention_gradcheck():
    q = rand(1, 2, 5, 4, requires_grad=True)
    k, v = rand(1, 1, 5, 4, requires_grad=True), rand(1, 1, 5, 4, requires_grad=True)
    assert gradcheck(lambda *a: reference.causal_attention(*a), (q, k, v))


# -------------------------------------------------------------------------- cross entropy --

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(reduction, label_smoothing):
    logits = rand(11, 13)
    target = torch.randint(0, 13, (11,))
    target[[2, 5]] = -100
    ours = reference.cross_entropy(logits, target, -100, reduction, label_smoothing)
    theirs = F.cross_entropy(logits, target, ignore_index=-100, reduction=reduction,
                             label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_cross_entropy_fast_path_equals_the_written_out_formula(label_smoothing):
    logits, target = rand(9, 17), torch.randint(0, 17, (9,))
    target[[0, 4]] = -100
    keep = target != -100
    fast = reference.cross_entropy(logits, target, -100, "none", label_smoothing)
    formula = reference.cross_entropy_rows_formula(logits, target, keep, label_smoothing, 0.0)
    torch.testing.assert_close(fast, formula, rtol=1e-12, atol=1e-12)


def test_cross_entropy_z_loss_adds_squared_logsumexp():
    logits, target = rand(6, 9), torch.randint(0, 9, (6,))
    target[0] = 3
    ignore = target == 3
    lse = torch.logsumexp(logits, -1)
    nll = lse - logits.gather(1, target[:, None]).squeeze(1)
    per_row = torch.where(ignore, 0.0, nll + 1e-2 * lse**2)
    ours = reference.cross_entropy(logits, target, ignore_index=3, reduction="none", z_loss=1e-2)
    torch.testing.assert_close(ours, per_row)
    mean = reference.cross_entropy(logits, target, ignore_index=3, reduction="mean", z_loss=1e-2)
    torch.testing.assert_close(mean, per_row.sum() / (~ignore).sum())


def test_cross_entropy_all_ignored_gives_zero_loss_and_zero_grad():
    logits = rand(4, 5, requires_grad=True)
    target = torch.full((4,), -100)
    loss = reference.cross_entropy(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_cross_entropy_none_keeps_target_shape_and_returns_fp32_for_half():
    logits = torch.randn(2, 3, 7, dtype=torch.float16)
    target = torch.randint(0, 7, (2, 3))
    loss = reference.cross_entropy(logits, target, reduction="none")
    assert loss.shape == (2, 3) and loss.dtype == torch.float32


def test_cross_entropy_gradcheck():
    logits = rand(5, 6, requires_grad=True)
    target = torch.tensor([0, 5, -100, 2, 2])
    for reduction in ("mean", "sum", "none"):
        assert gradcheck(
            lambda z: reference.cross_entropy(z, target, -100, reduction, 0.1, 1e-3), (logits,))


def test_linear_cross_entropy_matches_linear_then_torch_ce():
    x, weight, bias = rand(2, 5, 8), rand(11, 8), rand(11)
    target = torch.randint(0, 11, (2, 5))
    target[1, 2] = -100
    expected = F.cross_entropy(F.linear(x, weight, bias).reshape(-1, 11), target.reshape(-1))
    torch.testing.assert_close(reference.linear_cross_entropy(x, weight, target, bias), expected)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    assert gradcheck(lambda *a: reference.linear_cross_entropy(a[0], a[1], target, a[2]),
                     (x, weight, bias))
