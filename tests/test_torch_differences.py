"""The three deliberate differences of gptfast's losses from torch.nn.functional.cross_entropy,
as README's "Use" documents them, pinned on both backends next to what torch does."""

import pytest
import torch
import torch.nn.functional as F

import gptfast

BACKENDS = ["reference", "triton"]


def losses(backend, logits, target, x=None, weight=None, **options):
    """(cross_entropy, linear_cross_entropy) under backend; the second on x @ weight.T."""
    with gptfast.use_backend(backend):
        ce = gptfast.cross_entropy(logits, target, **options)
        lce = None if x is None else gptfast.linear_cross_entropy(x, weight, target, **options)
    return ce, lce


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_over_zero_counted_rows_is_zero_where_torch_gives_nan(backend):
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    logits = x.detach() @ weight.detach().t()
    logits.requires_grad_()
    target = torch.full((4,), -100)
    assert torch.isnan(F.cross_entropy(logits, target))  # torch: 0 / 0
    for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4}):
        ce, lce = losses(backend, logits * 1, target, x, weight, **options)
        assert ce.item() == 0.0 and lce.item() == 0.0
        grads = torch.autograd.grad(ce + lce, (logits, x, weight))
        assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [11, -1, 1000])
def test_out_of_range_target_is_a_value_error_where_torch_raises_index_error(backend, bad):
    logits, x, weight = torch.randn(4, 11), torch.randn(4, 8), torch.randn(11, 8)
    target = torch.tensor([0, bad, 3, -100])
    with pytest.raises(IndexError):  # torch on CPU (on CUDA: a device-side assert)
        F.cross_entropy(logits, target)
    with gptfast.use_backend(backend):
        with pytest.raises(ValueError, match=f"target holds class index {bad}, outside \\[0, 11\\)"):
            gptfast.cross_entropy(logits, target)
        with pytest.raises(ValueError, match=f"target holds class index {bad}"):
            gptfast.linear_cross_entropy(x, weight, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_logits_take_classes_on_the_last_dim(backend):
    B, T, V = 2, 5, 7
    logits, target = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    target[0, 1] = -100
    for reduction in ("mean", "none"):
        ce, _ = losses(backend, logits, target, reduction=reduction)
        # torch reads (B, C, T): the same loss needs the classes moved to dim 1
        want = F.cross_entropy(logits.transpose(1, 2).double(), target, reduction=reduction)
        torch.testing.assert_close(ce.double(), want, rtol=1e-5, atol=1e-6)
    assert losses(backend, logits, target, reduction="none")[0].shape == (B, T)
    # torch's (B, C, T) layout passed as is reads as B*C rows of T classes: here a shape error
    with gptfast.use_backend(backend), pytest.raises(ValueError, match="one class index per row"):
        gptfast.cross_entropy(logits.transpose(1, 2).contiguous(), target)


def test_out_of_range_target_under_torch_compile():
    """Compiled, the range check runs inside the Triton kernels; the reference backend is then
    torch's own op, with torch's error (README says so)."""
    logits, target = torch.randn(4, 5), torch.tensor([0, 9, 1, -100])
    for backend, error in (("triton", ValueError), ("reference", IndexError)):
        torch._dynamo.reset()
        compiled = torch.compile(gptfast.cross_entropy, fullgraph=True, backend="aot_eager")
        with gptfast.use_backend(backend), pytest.raises(error, match="9"):
            compiled(logits, target)
    torch._dynamo.reset()
