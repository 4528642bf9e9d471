"""The public ops: argument checks on every backend, and that "auto" on CPU is reference."""

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast import reference

BACKENDS = ["reference", "triton", "auto"]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def raises(backend, error, match, fn, *args, **kwargs):
    with gptfast.use_backend(backend), pytest.raises(error, match=match):
        fn(*args, **kwargs)


# ------------------------------------------------------------------- results on CPU auto --

def test_public_ops_on_cpu_auto_equal_reference():
    x, w, b = rand(3, 8), rand(8), rand(8)
    torch.testing.assert_close(gptfast.layer_norm(x, w, b), F.layer_norm(x, (8,), w, b))
    normed, total = gptfast.add_layer_norm(x, x, w, b)
    torch.testing.assert_close(normed, F.layer_norm(2 * x, (8,), w, b))
    q, k, v = rand(1, 2, 5, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4)
    torch.testing.assert_close(gptfast.causal_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    logits, target = rand(6, 10), torch.tensor([1, 2, 3, -100, 9, 0])
    torch.testing.assert_close(gptfast.cross_entropy(logits, target), F.cross_entropy(logits, target))
    weight = rand(10, 8)
    torch.testing.assert_close(gptfast.linear_cross_entropy(rand(6, 8).mul(0), weight, target),
                               torch.tensor(10.0).log())


def test_auto_on_cpu_never_calls_a_kernel(monkeypatch):
    from gptfast import backend

    kernel = backend.registered_kernel("layer_norm")
    assert kernel is not None, "the LayerNorm kernel is registered in functional.py"

    def fail(*args, **kwargs):
        raise AssertionError("auto ran the Triton kernel on CPU tensors")

    monkeypatch.setattr(type(kernel), "function", property(lambda self: fail))
    x = rand(2, 4)
    torch.testing.assert_close(gptfast.layer_norm(x), reference.layer_norm(x))


def test_gradients_flow_through_public_ops():
    x = rand(4, 6).requires_grad_()
    gptfast.cross_entropy(gptfast.layer_norm(x), torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------- bad arguments --

@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_bad_arguments_name_the_argument(backend):
    x = rand(3, 4)
    raises(backend, TypeError, "x must be a torch.Tensor", gptfast.layer_norm, [1.0, 2.0])
    raises(backend, TypeError, "x must be a floating-point", gptfast.layer_norm, torch.ones(3, 4, dtype=torch.long))
    raises(backend, ValueError, "x must have a non-empty last dim", gptfast.layer_norm, torch.ones(()))
    raises(backend, ValueError, "weight must have shape \\(4,\\)", gptfast.layer_norm, x, rand(5))
    raises(backend, ValueError, "bias must have shape", gptfast.layer_norm, x, rand(4), rand(2, 2))
    raises(backend, TypeError, "weight must be a floating-point", gptfast.layer_norm, x, torch.ones(4, dtype=torch.int32))
    raises(backend, ValueError, "eps must be >", gptfast.layer_norm, x, None, None, 0.0)
    raises(backend, TypeError, "eps must be a number", gptfast.layer_norm, x, None, None, "1e-5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_layer_norm_bad_arguments(backend):
    x = rand(3, 4)
    raises(backend, ValueError, "residual must have the shape of x", gptfast.add_layer_norm, x, rand(3, 5))
    raises(backend, TypeError, "residual must be a torch.Tensor", gptfast.add_layer_norm, x, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_attention_bad_arguments(backend):
    q = rand(1, 4, 5, 8)
    kv = rand(1, 2, 5, 8)
    attend = gptfast.causal_attention
    raises(backend, ValueError, "q must be 4-D", attend, rand(4, 5, 8), kv, kv)
    raises(backend, ValueError, "k and v must have the same shape", attend, q, kv, rand(1, 1, 5, 8))
    raises(backend, ValueError, "q heads \\(4\\) must be a multiple of k/v heads \\(3\\)", attend, q, rand(1, 3, 5, 8), rand(1, 3, 5, 8))
    raises(backend, ValueError, "k must have q's batch, seq and head_dim", attend, q, rand(1, 2, 6, 8), rand(1, 2, 6, 8))
    raises(backend, TypeError, "q, k, v must share a dtype", attend, q, kv.half(), kv.half())
    raises(backend, TypeError, "k must be a floating-point", attend, q, kv.long(), kv.long())
    raises(backend, ValueError, "scale must be >", attend, q, kv, kv, -1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_bad_arguments(backend):
    logits = rand(4, 6)
    target = torch.tensor([0, 1, 5, -100])
    ce = gptfast.cross_entropy
    raises(backend, ValueError, "logits must be \\(N, V\\)", ce, rand(6), torch.tensor(1))
    raises(backend, TypeError, "target must be an integer tensor", ce, logits, target.float())
    raises(backend, ValueError, "one class index per row of logits \\(4 rows\\)", ce, logits, target[:3])
    raises(backend, ValueError, "target holds class index 6, outside \\[0, 6\\)", ce, logits, torch.tensor([0, 6, 1, 1]))
    raises(backend, ValueError, "target holds class index -3", ce, logits, torch.tensor([0, -3, 1, 1]))
    raises(backend, ValueError, "reduction must be one of", ce, logits, target, reduction="avg")
    raises(backend, ValueError, "label_smoothing must be <= 1", ce, logits, target, label_smoothing=1.5)
    raises(backend, ValueError, "z_loss must be >= 0", ce, logits, target, z_loss=-1.0)
    raises(backend, TypeError, "ignore_index must be an int", ce, logits, target, ignore_index=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_bad_arguments(backend):
    x, weight = rand(4, 8), rand(10, 8)
    target = torch.tensor([0, 1, 9, -100])
    lce = gptfast.linear_cross_entropy
    raises(backend, ValueError, "weight must be \\(V, C\\) with C = 8", lce, x, rand(10, 7), target)
    raises(backend, TypeError, "weight must have x's dtype", lce, x, weight.double(), target)
    raises(backend, ValueError, "bias must have shape \\(10,\\)", lce, x, weight, target, rand(9))
    raises(backend, ValueError, "one class index per row of x \\(4 rows\\)", lce, x, weight, target[:2])
    raises(backend, ValueError, "target holds class index 10", lce, x, weight, torch.tensor([0, 1, 10, 1]))
    raises(backend, TypeError, "x must be a floating-point", lce, x.long(), weight, target)


def test_ignore_index_outside_vocab_is_not_an_error():
    loss = gptfast.cross_entropy(rand(3, 5), torch.tensor([1, 4, 99]), ignore_index=99)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_options_are_rejected(backend, value):
    logits, target = rand(4, 6), torch.tensor([0, 1, 5, -100])
    x, weight = rand(4, 8), rand(6, 8)
    raises(backend, ValueError, "label_smoothing must be a finite number", gptfast.cross_entropy,
           logits, target, label_smoothing=value)
    raises(backend, ValueError, "z_loss must be a finite number", gptfast.cross_entropy,
           logits, target, z_loss=value)
    raises(backend, ValueError, "z_loss must be a finite number", gptfast.linear_cross_entropy,
           x, weight, target, z_loss=value)
    raises(backend, ValueError, "eps must be a finite number", gptfast.layer_norm, x, None, None, value)
    raises(backend, ValueError, "eps must be a finite number", gptfast.add_layer_norm, x, x, None, None, value)
    q = rand(1, 2, 3, 4)
    raises(backend, ValueError, "scale must be a finite number", gptfast.causal_attention, q, q, q, value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_beyond_int64_names_the_argument(backend):
    logits, target = rand(4, 6), torch.tensor([0, 1, 5, 2])
    for value in (2**70, -(2**63) - 1):
        raises(backend, ValueError, "ignore_index must fit in int64", gptfast.cross_entropy,
               logits, target, ignore_index=value)
        raises(backend, ValueError, "ignore_index must fit in int64", gptfast.linear_cross_entropy,
               rand(4, 8), rand(6, 8), target, ignore_index=value)
    want = F.cross_entropy(logits, target)
    torch.testing.assert_close(gptfast.cross_entropy(logits, target, ignore_index=2**63 - 1), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint64_targets_name_the_argument(backend):
    if not hasattr(torch, "uint64"):
        pytest.skip("this torch has no uint64")
    target = torch.tensor([0, 1, 5, 2]).to(torch.uint64)
    raises(backend, TypeError, "target dtype torch.uint64 is not supported", gptfast.cross_entropy,
           rand(4, 6), target)
    raises(backend, TypeError, "target dtype torch.uint64 is not supported",
           gptfast.linear_cross_entropy, rand(4, 8), rand(6, 8), target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_wide_unsigned_targets_are_class_indices_by_value(backend, dtype):
    dtype = getattr(torch, dtype, None)
    if dtype is None:
        pytest.skip("this torch has no such dtype")
    logits, x, weight = rand(4, 300), rand(4, 8), rand(300, 8)
    # 65436 is -100 wrapped into uint16: it must be out of range, not ignored
    target = torch.tensor([0, 299, 17, 100])
    with gptfast.use_backend(backend):
        torch.testing.assert_close(gptfast.cross_entropy(logits, target.to(dtype)),
                                   F.cross_entropy(logits, target))
        torch.testing.assert_close(gptfast.linear_cross_entropy(x, weight, target.to(dtype)),
                                   F.cross_entropy(x @ weight.T, target))
    bad = torch.tensor([0, 65436, 1, 2]).to(dtype)
    raises(backend, ValueError, "class index 65436", gptfast.cross_entropy, logits, bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_targets_work_on_both_backends(dtype):
    logits, target = rand(4, 6), torch.tensor([0, 1, 5, 2])
    want = F.cross_entropy(logits, target)
    for backend in ("reference", "triton"):
        with gptfast.use_backend(backend):
            got = gptfast.cross_entropy(logits, target.to(dtype))
        torch.testing.assert_close(got, want)


def test_meta_tensors_give_shapes_on_reference_and_a_clear_error_on_triton():
    logits, target = torch.empty(4, 6, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    x, weight = torch.empty(4, 8, device="meta"), torch.empty(6, 8, device="meta")
    for backend in ("auto", "reference"):
        with gptfast.use_backend(backend):
            loss = gptfast.cross_entropy(logits, target, reduction="none")
            assert loss.is_meta and loss.shape == (4,)
            assert gptfast.linear_cross_entropy(x, weight, target).is_meta
    raises("triton", gptfast.BackendUnavailable, "tensors are on meta", gptfast.cross_entropy,
           logits, target)
    raises("triton", gptfast.BackendUnavailable, "tensors are on meta",
           gptfast.linear_cross_entropy, x, weight, target)
    raises("auto", ValueError, "target is on cpu but logits is on meta", gptfast.cross_entropy,
           logits, torch.zeros(4, dtype=torch.long))
