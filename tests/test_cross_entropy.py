"""Cross-entropy kernels against gptfast.reference in fp64.

CPU tests run the real kernels through the Triton interpreter (conftest sets TRITON_INTERPRET=1)
in fp32, fp16 and bf16 (by value, through the conftest's gptfast.testing.enable_interpreter_bf16)
at small shapes; full-size shapes are in the GPU tests at the end (`pytest -m gpu` on a CUDA
machine).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gptfast
from gptfast import reference
from gptfast.testing import bf16_tolerance
from gptfast.nn import CrossEntropyLoss, LinearCrossEntropy

ce = pytest.importorskip("gptfast.kernels.cross_entropy")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
TOL[torch.bfloat16] = bf16_tolerance(TOL[torch.float16])
N, V = 29, 1003


def make_target(rows, vocab, ignore_every=4, dtype=torch.int64):
    target = torch.randint(0, vocab, (rows,), dtype=dtype)
    target[1::ignore_every] = -100
    return target


def upstream(reduction, rows):
    """A non-uniform upstream gradient for "none", a non-unit scalar otherwise."""
    return torch.rand(rows) + 0.5 if reduction == "none" else torch.tensor(1.7)


def reference_loss_and_grad(values, target, grad, **options):
    """Reference loss and d(loss)/d(logits) on an fp64 copy of the (already rounded) values."""
    leaf = values.detach().double().requires_grad_()
    loss = reference.cross_entropy(leaf, target, **options)
    (dlogits,) = torch.autograd.grad(loss, leaf, grad.double())
    return loss, dlogits


def triton_loss_and_grad(values, target, grad, keep_logits=False, **options):
    """Loss and gradient through the public op; the logits are a non-leaf, so by default
    (keep_logits=False) this is the in-place path."""
    logits = values.clone().requires_grad_() * 1
    with gptfast.use_backend("triton"):
        loss = gptfast.cross_entropy(logits, target, keep_logits=keep_logits, **options)
    (dlogits,) = torch.autograd.grad(loss, logits, grad)
    return loss, dlogits, logits


def assert_close(got, want, dtype, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(got.double(), want.double(), **tol)


# --------------------------------------------------------------------- cross_entropy --

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-2)])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_cross_entropy_matches_reference(dtype, reduction, label_smoothing, z_loss, keep_logits):
    values = (3 * torch.randn(N, V)).to(dtype)
    target = make_target(N, V)
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    grad = upstream(reduction, N)
    want_loss, want_grad = reference_loss_and_grad(values, target, grad, **options)
    loss, dlogits, logits = triton_loss_and_grad(values, target, grad.float(),
                                                 keep_logits=keep_logits, **options)
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
    assert_close(loss, want_loss, dtype, scale=10 if reduction == "sum" else 1)
    assert dlogits.dtype == dtype
    assert_close(dlogits, want_grad, dtype)
    assert (dlogits[1::4] == 0).all()


def test_mean_with_unit_upstream_gradient_skips_rescaling():
    values, target = torch.randn(N, V), make_target(N, V)
    loss, dlogits, _ = triton_loss_and_grad(values, target, torch.tensor(1.0))
    _, want = reference_loss_and_grad(values, target, torch.tensor(1.0))
    assert_close(dlogits, want, torch.float32)


def test_gradient_is_written_into_the_logits_storage():
    values, target = torch.randn(N, V), make_target(N, V)
    _, dlogits, logits = triton_loss_and_grad(values, target, torch.tensor(1.0))
    assert dlogits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()


class CountNewBigTensors(TorchDispatchMode):
    """Counts op outputs of at least ``numel`` elements that do not share an input's storage."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("policy,keep_logits,big_tensors", [
    ("auto", False, 0), ("auto", True, 1), ("keep", False, 1)])
def test_in_place_path_allocates_no_rows_by_vocab_tensor(policy, keep_logits, big_tensors):
    logits = torch.randn(N, V).requires_grad_() * 1
    target = make_target(N, V)
    with gptfast.use_backend("triton"), ce.logits_policy(policy), CountNewBigTensors(N * V) as mode:
        loss = gptfast.cross_entropy(logits, target, reduction="none", keep_logits=keep_logits)
        torch.autograd.grad(loss, logits, torch.rand(N))
    assert len(mode.ops) == big_tensors, mode.ops  # "keep" must allocate its gradient


@pytest.mark.parametrize("make_logits,policy,keep_logits", [
    pytest.param(lambda leaf: leaf * 1, "auto", True, id="default"),
    pytest.param(lambda leaf: leaf, "auto", False, id="leaf"),
    pytest.param(lambda leaf: leaf.view(N, V), "auto", False, id="view-of-leaf"),
    pytest.param(lambda leaf: leaf * 1, "keep", False, id="keep-policy"),
    pytest.param(lambda leaf: (leaf[:1] * 1).expand(N, V), "auto", False, id="expanded-rows"),
    pytest.param(lambda leaf: (leaf * 1).as_strided((N, V), (V // 2, 1)), "overwrite", False,
                 id="overlapping-rows"),
])
def test_logits_the_caller_may_still_need_are_not_overwritten(make_logits, policy, keep_logits):
    leaf = torch.randn(N, V, requires_grad=True)
    before = make_logits(leaf.detach().clone())
    target = make_target(N, V)
    logits = make_logits(leaf)
    with gptfast.use_backend("triton"), ce.logits_policy(policy):
        loss = gptfast.cross_entropy(logits, target, reduction="none", keep_logits=keep_logits)
    grad = torch.rand(N)
    loss.backward(grad)
    assert torch.equal(logits.detach(), before)
    want_leaf = leaf.detach().double().requires_grad_()
    want = reference.cross_entropy(make_logits(want_leaf), target, reduction="none")
    assert_close(leaf.grad, torch.autograd.grad(want, want_leaf, grad.double())[0], torch.float32)


def test_overwrite_policy_writes_into_a_leaf():
    leaf = torch.randn(N, V, requires_grad=True)
    values, target = leaf.detach().clone(), make_target(N, V)
    with gptfast.use_backend("triton"), ce.logits_policy("overwrite"):
        loss = gptfast.cross_entropy(leaf, target)
    _, want = reference_loss_and_grad(values, target, torch.tensor(1.0))
    assert_close(leaf.detach(), want, torch.float32)
    loss.backward()
    assert_close(leaf.grad, want, torch.float32)
    assert leaf.grad.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr()


def test_logits_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="logits policy must be one of"):
        with ce.logits_policy("sometimes"):
            pass


def test_autograd_node_that_saved_the_logits_raises_instead_of_reading_gradients():
    y = torch.randn(N, V, requires_grad=True)
    logits = torch.tanh(y)  # tanh saves its output for backward
    with gptfast.use_backend("triton"):
        loss = gptfast.cross_entropy(logits, make_target(N, V), keep_logits=False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_grad_only_the_loss_is_computed():
    logits, target = torch.randn(N, V).requires_grad_() * 1, make_target(N, V)
    before = logits.detach().clone()
    with gptfast.use_backend("triton"), torch.no_grad():
        loss = gptfast.cross_entropy(logits, target, label_smoothing=0.2)
    assert_close(loss, reference.cross_entropy(before.double(), target, label_smoothing=0.2),
                 torch.float32)
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("policy", ["auto", "keep"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction, policy):
    logits = (torch.randn(5, 11) * 1e4).requires_grad_() * 1
    target = torch.full((5,), -100)
    with gptfast.use_backend("triton"), ce.logits_policy(policy):
        loss = gptfast.cross_entropy(logits, target, reduction=reduction, z_loss=1e-3)
    (dlogits,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dlogits, torch.zeros_like(dlogits))


@pytest.mark.parametrize("rows,vocab", [(13, 7), (5, 5000)])
def test_vocab_below_and_above_one_block(rows, vocab):
    assert vocab > ce._launch_config(5000, 4)[0] or vocab < 16
    values, target = 4 * torch.randn(rows, vocab), make_target(rows, vocab, ignore_every=3)
    grad = torch.rand(rows) + 0.5
    options = dict(reduction="none", label_smoothing=0.05, z_loss=1e-3)
    loss, dlogits, _ = triton_loss_and_grad(values, target, grad, **options)
    want_loss, want_grad = reference_loss_and_grad(values, target, grad, **options)
    assert_close(loss, want_loss, torch.float32)
    assert_close(dlogits, want_grad, torch.float32)


def test_int32_targets_batched_logits_and_custom_ignore_index():
    values = torch.randn(2, 7, 50)
    target = torch.randint(0, 50, (2, 7), dtype=torch.int32)
    target[0, :3] = 3  # ignore_index inside [0, V) wins over being a class
    loss, dlogits, _ = triton_loss_and_grad(values, target, torch.rand(2, 7), reduction="none",
                                            ignore_index=3)
    assert loss.shape == (2, 7)
    want_loss, want_grad = reference_loss_and_grad(values, target, torch.zeros(2, 7),
                                                   reduction="none", ignore_index=3)
    assert_close(loss, want_loss, torch.float32)
    assert (dlogits[target == 3] == 0).all()


def test_strided_inputs():
    """Logits without unit stride along V are copied first; x may be any strided view."""
    base, target = torch.randn(50, 20, requires_grad=True), make_target(20, 50)
    grad = torch.rand(20)
    with gptfast.use_backend("triton"):
        loss = gptfast.cross_entropy(base.t() * 1, target, reduction="none")
    (got,) = torch.autograd.grad(loss, base, grad)
    (want,) = torch.autograd.grad(reference.cross_entropy(base.t() * 1, target, reduction="none"), base, grad)
    assert_close(got, want, torch.float32)
    x, weight = torch.randn(6, 20, requires_grad=True), torch.randn(50, 6, requires_grad=True)
    with gptfast.use_backend("triton"):
        got = torch.autograd.grad(gptfast.linear_cross_entropy(x.t(), weight, target), (x, weight))
    want = torch.autograd.grad(reference.linear_cross_entropy(x.t(), weight, target), (x, weight))
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_empty_inputs():
    logits = torch.randn(0, 9).requires_grad_() * 1
    with gptfast.use_backend("triton"):
        assert gptfast.cross_entropy(logits, torch.zeros(0, dtype=torch.long)).item() == 0
        assert gptfast.cross_entropy(logits, torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)
        x, weight = torch.randn(0, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
        gptfast.linear_cross_entropy(x, weight, torch.zeros(0, dtype=torch.long)).backward()
    assert x.grad.shape == (0, 4) and torch.equal(weight.grad, torch.zeros(9, 4))


@pytest.mark.parametrize("bad", [V, -1])
def test_target_out_of_range_raises_value_error(bad):
    target = make_target(N, V)
    target[5] = bad
    with gptfast.use_backend("triton"), pytest.raises(ValueError, match=f"class index {bad}"):
        gptfast.cross_entropy(torch.randn(N, V), target)
    with gptfast.use_backend("triton"), pytest.raises(ValueError, match=f"class index {bad}"):
        gptfast.linear_cross_entropy(torch.randn(N, 4), torch.randn(V, 4), target)


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable):
        gptfast.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable):
        gptfast.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))


def test_unsupported_dtypes_are_named():
    logits = torch.randn(2, 3, dtype=torch.float64)
    assert "float64" in ce.cross_entropy_unsupported(logits, torch.tensor([0, 1]))
    assert ce.cross_entropy_unsupported(logits.float(), torch.tensor([0, 1])) is None
    assert "float64" in ce.linear_cross_entropy_unsupported(logits, logits, torch.tensor([0, 1]))


def test_second_loss_on_logits_it_overwrote_raises():
    logits = torch.randn(N, V).requires_grad_() * 1
    target = make_target(N, V)
    with gptfast.use_backend("triton"):
        gptfast.cross_entropy(logits, target, keep_logits=False)
        for view in (logits, logits.view(1, N, V)):
            with pytest.raises(RuntimeError, match="already overwritten by their gradient"):
                gptfast.cross_entropy(view, target)
        with torch.no_grad():
            logits.copy_(torch.randn(N, V))  # new values, new version: logits again
        loss = gptfast.cross_entropy(logits, target)
    want = reference.cross_entropy(logits.detach().double(), target)
    assert_close(loss, want, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_overwritten_logits_raises(reduction):
    h, weight = torch.randn(N, 8, requires_grad=True), torch.randn(V, 8)
    target = make_target(N, V)
    with gptfast.use_backend("triton"):
        loss = gptfast.cross_entropy(h @ weight.T, target, reduction=reduction, keep_logits=False)
    grad = upstream(reduction, N)
    loss.backward(grad, retain_graph=True)
    want = h.grad.clone()
    with pytest.raises(RuntimeError, match="cannot run backward a second time"):
        loss.backward(grad)
    h64 = h.detach().double().requires_grad_()
    reference.cross_entropy(h64 @ weight.double().T, target, reduction=reduction).backward(grad.double())
    assert_close(want, h64.grad, torch.float32)


def test_double_backward_of_overwritten_logits_raises_when_differentiated():
    h, weight = torch.randn(N, 8, requires_grad=True), torch.randn(V, 8)
    target = make_target(N, V)
    with gptfast.use_backend("triton"):
        loss = gptfast.cross_entropy(h @ weight.T, target, keep_logits=False)
    (grad_h,) = torch.autograd.grad(loss, h, create_graph=True)
    h64 = h.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.cross_entropy(h64 @ weight.double().T, target), h64)
    assert_close(grad_h, want, torch.float32)  # the values are right; a graph of them is not
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad_h.square().sum().backward()


# --------------------------------------------------------------- linear_cross_entropy --

def linear_reference(x, weight, bias, target, grad, **options):
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    loss = reference.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], **options)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], grad.double())
    return loss, grads


def linear_triton(x, weight, bias, target, grad, **options):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    with gptfast.use_backend("triton"):
        loss = gptfast.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], **options)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], grad)
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_reference(monkeypatch, dtype, reduction, with_bias):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 8)  # 37 rows: 4 full chunks and one of 5
    rows, hidden, vocab = 37, 12, 53
    x, weight = torch.randn(rows, hidden).to(dtype), (torch.randn(vocab, hidden) / 3).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    target = make_target(rows, vocab)
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    grad = upstream(reduction, rows)
    want_loss, want_grads = linear_reference(x, weight, bias, target, grad, **options)
    loss, grads = linear_triton(x, weight, bias, target, grad.float(), **options)
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
    assert_close(loss, want_loss, dtype, scale=10 if reduction == "sum" else 1)
    for got, want in zip(grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, scale=5)


def test_linear_chunks_never_hold_rows_by_vocab(monkeypatch):
    rows, hidden, vocab = 40, 8, 30
    monkeypatch.setattr(ce, "CHUNK_ROWS", 16)
    seen = []
    launch = ce._launch_cross_entropy
    monkeypatch.setattr(ce, "_launch_cross_entropy",
                        lambda logits, *args: (seen.append(logits.shape), launch(logits, *args)))
    x, weight = torch.randn(rows, hidden, requires_grad=True), torch.randn(vocab, hidden, requires_grad=True)
    with gptfast.use_backend("triton"), CountNewBigTensors(rows * vocab) as mode:
        gptfast.linear_cross_entropy(x, weight, make_target(rows, vocab)).backward()
    assert seen == [(16, vocab), (16, vocab), (8, vocab)]
    assert mode.ops == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_linear_weight_gradient_accumulates_in_fp32(monkeypatch, dtype):
    """Half-precision inputs in 96 chunks: rounding the running dW to the input dtype after each
    chunk would show."""
    rows, chunk, hidden, vocab = 384, 4, 8, 16
    monkeypatch.setattr(ce, "CHUNK_ROWS", chunk)
    x = torch.randn(rows, hidden).to(dtype)
    weight = (torch.randn(vocab, hidden) / 4).to(dtype)
    target = torch.randint(0, vocab, (rows,))
    _, (_, want) = linear_reference(x, weight, None, target, torch.tensor(1.0), reduction="sum")
    _, (_, got) = linear_triton(x, weight, None, target, torch.tensor(1.0), reduction="sum")
    error = ((got.double() - want).abs().max() / want.abs().max()).item()

    logits = x.double() @ weight.double().t()
    dlogits = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, vocab)).to(dtype)
    running = torch.zeros(vocab, hidden, dtype=dtype)
    for start in range(0, rows, chunk):  # what a half-precision accumulator would do
        partial = dlogits[start:start + chunk].t().float() @ x[start:start + chunk].float()
        running = (running.float() + partial).to(dtype)
    half_error = ((running.double() - want).abs().max() / want.abs().max()).item()
    bound, above = (6e-4, 1.5e-3) if dtype == torch.float16 else bf16_tolerance((6e-4, 1.5e-3))
    assert error < bound < above < half_error, (error, half_error)


def test_linear_fp16_keeps_small_gradients_under_a_loss_scale(monkeypatch):
    """fp16, mean over rows, a GradScaler-size upstream gradient: dx must not underflow.

    dx = (1/N) (p - onehot) @ W is ~1e-8 here, subnormal in fp16; it is only representable
    once the upstream 2^16 is folded in, which is why fp16 computes its gradients in backward.
    """
    monkeypatch.setattr(ce, "CHUNK_ROWS", 128)
    rows, hidden, vocab = 256, 8, 32
    x, weight = torch.randn(rows, hidden).half(), (torch.randn(vocab, hidden) / 20000).half()
    target = torch.randint(0, vocab, (rows,))
    scale = torch.tensor(2.0 ** 16)
    _, want = linear_reference(x, weight, None, target, scale)
    _, got = linear_triton(x, weight, None, target, scale)
    for g, w in zip(got, want):
        assert ((g.double() - w).abs().max() / w.abs().max()).item() < 2e-3

    logits = x.double() @ weight.double().t()
    dlogits = torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, vocab)
    grad_x_in_fp16 = ((dlogits / rows).half().double() @ weight.double()).half()  # before the scale
    scaled_afterwards = grad_x_in_fp16.double() * scale.double()
    assert ((scaled_afterwards - want[0]).abs().max() / want[0].abs().max()).item() > 2e-2


def test_linear_gradients_only_where_required():
    x, weight, bias = torch.randn(9, 6), torch.randn(11, 6, requires_grad=True), torch.randn(11)
    target = make_target(9, 11)
    with gptfast.use_backend("triton"):
        gptfast.linear_cross_entropy(x, weight, target, bias).backward()
    w64 = weight.detach().double().requires_grad_()
    reference.linear_cross_entropy(x.double(), w64, target, bias.double()).backward()
    assert_close(weight.grad, w64.grad, torch.float32)


def test_linear_without_grad_only_computes_the_loss():
    x, weight, target = torch.randn(9, 6), torch.randn(11, 6, requires_grad=True), make_target(9, 11)
    with gptfast.use_backend("triton"), torch.no_grad():
        loss = gptfast.linear_cross_entropy(x, weight, target, reduction="sum", label_smoothing=0.3)
    want = reference.linear_cross_entropy(x.double(), weight.double(), target, reduction="sum",
                                          label_smoothing=0.3)
    assert not loss.requires_grad
    assert_close(loss, want, torch.float32)


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                             (torch.float16, "sum"), (torch.bfloat16, "mean")])
@pytest.mark.parametrize("edited", ["x", "weight", "bias"])
def test_linear_in_place_edit_before_backward_raises(dtype, reduction, edited):
    """As on the reference backend (F.linear saves x, W): never the stale or the new values."""
    tensors = dict(x=torch.randn(9, 6).to(dtype).requires_grad_(),
                   weight=torch.randn(11, 6).to(dtype).requires_grad_(),
                   bias=torch.randn(11).to(dtype).requires_grad_())
    with gptfast.use_backend("triton"):
        loss = gptfast.linear_cross_entropy(tensors["x"], tensors["weight"], make_target(9, 11),
                                            tensors["bias"], reduction=reduction)
    with torch.no_grad():
        tensors[edited].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.ones_like(loss))


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                             (torch.float16, "mean"), (torch.bfloat16, "sum")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_retain_graph_second_backward_matches_reference(monkeypatch, dtype, reduction,
                                                               with_bias):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 4)
    x, weight = torch.randn(9, 6).to(dtype), torch.randn(11, 6).to(dtype)
    bias = torch.randn(11).to(dtype) if with_bias else None
    target = make_target(9, 11)
    grads = [upstream(reduction, 9), upstream(reduction, 9) * 3]
    results = {}
    for backend, cast in (("triton", lambda t: t), ("reference", lambda t: t.double())):
        leaves = [None if t is None else cast(t.clone()).requires_grad_() for t in (x, weight, bias)]
        with gptfast.use_backend(backend):
            loss = gptfast.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2],
                                                reduction=reduction)
        for grad in grads:  # accumulates both backwards into .grad
            loss.backward(cast(grad.float()), retain_graph=True)
        results[backend] = [t.grad for t in leaves if t is not None]
    for got, want in zip(results["triton"], results["reference"]):
        assert_close(got, want, dtype, scale=5)


def test_linear_double_backward_matches_reference():
    x, weight = torch.randn(9, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True)
    target = make_target(9, 11)
    results = []
    for backend, cast in (("triton", lambda t: t), ("reference", lambda t: t.double())):
        xb, wb = cast(x.detach()).requires_grad_(), cast(weight.detach()).requires_grad_()
        with gptfast.use_backend(backend):
            loss = gptfast.linear_cross_entropy(xb, wb, target, z_loss=1e-2, label_smoothing=0.1)
        grad_x, grad_w = torch.autograd.grad(loss, (xb, wb), create_graph=True)
        (grad_x.square().sum() + grad_w.abs().sum()).backward()
        results.append((xb.grad, wb.grad))
    for got, want in zip(*results):
        assert_close(got, want, torch.float32)


def test_chunk_rows_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert ce.chunk_rows(16384, 50257, 768, 2, cpu) == 768  # chunk logits == weight bytes
    assert ce.chunk_rows(100, 50257, 768, 2, cpu) == 100
    assert ce.chunk_rows(1 << 20, 128256, 4096, 2, cpu) == 1024  # 256 MiB cap, 64-row multiple
    monkeypatch.setenv("GPTFAST_CE_CHUNK_ROWS", "5")
    assert ce.chunk_rows(16384, 50257, 768, 2, cpu) == 5


# ------------------------------------------------------------------------ torch.compile --

def _compiled_matches_reference(fn, kernel_op, reference_op, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    params = [torch.randn(4, 3, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)]
    target = torch.randint(0, 37, (4, 3))
    target[0] = -100  # the rows Liger's fused linear CE gets wrong under compile
    target[2, 1] = -100
    for reduction in ("mean", "none"):
        want = fn(*params, target, reduction, reference_op)
        grad = torch.rand_like(want) + 0.5
        want_grads = torch.autograd.grad(want, params, grad)
        with gptfast.use_backend("triton"):
            got = compiled(*params, target, reduction, kernel_op)
        got_grads = torch.autograd.grad(got, params, grad)
        assert_close(got, want, torch.float32)
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, torch.float32)


def _logits_then_ce(x, weight, target, reduction, op):
    return op(torch.tanh(x) @ weight.t(), target, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)


def _linear_ce(x, weight, target, reduction, op):
    return op(torch.tanh(x), weight, target, reduction=reduction, z_loss=1e-3)


def test_cross_entropy_compiles_fullgraph():
    _compiled_matches_reference(_logits_then_ce, ce.cross_entropy, reference.cross_entropy)


def test_linear_cross_entropy_compiles_fullgraph(monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 5)
    _compiled_matches_reference(_linear_ce, ce.linear_cross_entropy, reference.linear_cross_entropy)


def test_compiled_ops_raise_value_error_for_out_of_range_targets():
    torch._dynamo.reset()
    target = torch.tensor([0, -100, 9, 2])
    x, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    compiled_ce = torch.compile(lambda x, w, t: ce.cross_entropy(x @ w.t(), t), fullgraph=True,
                                backend="aot_eager")
    with pytest.raises(ValueError, match="class index 9"):
        compiled_ce(x, weight, target)
    compiled_linear = torch.compile(ce.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="class index 9"):
        compiled_linear(x, weight, target)


def test_public_api_compiles_fullgraph(triton_backend):
    _compiled_matches_reference(_logits_then_ce, gptfast.cross_entropy, reference.cross_entropy)
    _compiled_matches_reference(_linear_ce, gptfast.linear_cross_entropy,
                                reference.linear_cross_entropy)


# ------------------------------------------------------------ targets of every integer dtype --
# Class indices are compared with ignore_index and V by value, whatever target's integer
# dtype: torch would wrap the Python int into the dtype (uint8: -100 == 156, >= 256 is >= 0).
# An ignore_index outside the dtype's range never matches. Expected values come from
# F.cross_entropy on int64 targets in fp64.

TARGET_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
BYTE_VOCAB = 256


def _narrow_case(dtype, ignore_index):
    """Targets in ``dtype`` over V=256 holding 0, 3, the largest class the dtype holds and,
    when it fits the dtype, ignore_index itself; ignore_index may be outside the range."""
    info = torch.iinfo(dtype)
    top = min(info.max, BYTE_VOCAB - 1)
    values = [0, 3, top, 156 if top >= 156 else 100, 7, 3, top, 0]
    if info.min <= ignore_index <= info.max:
        values[4] = ignore_index
    return torch.tensor(values, dtype=torch.int64)


def _ignore_indices(dtype):
    """-100 (default), -1, a class (3), and values outside the dtype that wrap onto class 3
    (2**bits + 3, -2**bits + 3) or, for uint8, onto the top classes (-1 -> 255, -100 -> 156)."""
    values = [-100, -1, 3]
    if dtype != torch.int64:
        bits = torch.iinfo(dtype).bits
        values += [2**bits + 3, -(2**bits) + 3]
    return values


def _wanted(logits, weight, target, ignore_index, reduction, grad):
    """F.cross_entropy (int64 targets, fp64) loss and the gradients of its inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (logits, weight) if t is not None]
    rows = leaves[0] if weight is None else leaves[0] @ leaves[1].T
    loss = F.cross_entropy(rows, target.long(), ignore_index=ignore_index, reduction=reduction)
    return loss, torch.autograd.grad(loss, leaves, grad.double())


def _got(backend, function, logits, weight, target, ignore_index, reduction, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (logits, weight) if t is not None]
    with gptfast.use_backend(backend):
        if function == "cross_entropy":
            loss = gptfast.cross_entropy(leaves[0] * 1, target, ignore_index, reduction)
        else:
            loss = gptfast.linear_cross_entropy(leaves[0], leaves[1], target, None, ignore_index,
                                                reduction)
    return loss, torch.autograd.grad(loss, leaves, grad)


def _inputs(function, rows):
    if function == "cross_entropy":
        return 3 * torch.randn(rows, BYTE_VOCAB), None
    return torch.randn(rows, 6), torch.randn(BYTE_VOCAB, 6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("function", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("dtype", TARGET_DTYPES, ids=str)
def test_targets_of_every_integer_dtype_compare_by_value(backend, function, dtype):
    """Every ignore_index of :func:`_ignore_indices`, the reductions taking turns."""
    for i, ignore_index in enumerate(_ignore_indices(dtype)):
        reduction = ("mean", "none", "sum")[i % 3]
        wide = _narrow_case(dtype, ignore_index)
        target = wide.to(dtype)
        assert torch.equal(target.long(), wide)
        logits, weight = _inputs(function, len(wide))
        grad = upstream(reduction, len(wide))
        want, want_grads = _wanted(logits, weight, wide, ignore_index, reduction, grad)
        got, got_grads = _got(backend, function, logits, weight, target, ignore_index,
                              reduction, grad)
        where = f"{dtype} ignore_index={ignore_index} {reduction}"
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5, msg=where)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=where)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("function", ["cross_entropy", "linear_cross_entropy"])
def test_uint8_targets_issue_example(backend, function):
    """V=250, uint8 targets [0, 156, 17, 100]: -100 must not match 156 (issue 23)."""
    wide = torch.tensor([0, 156, 17, 100])
    if function == "cross_entropy":
        logits, weight = 3 * torch.randn(4, 250), None
    else:
        logits, weight = torch.randn(4, 8), torch.randn(250, 8)
    grad = torch.tensor(1.0)
    want, want_grads = _wanted(logits, weight, wide, -100, "mean", grad)
    got, got_grads = _got(backend, function, logits, weight, wide.to(torch.uint8), -100, "mean",
                          grad)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_byte_level_model_with_uint8_targets(backend):
    """V=256 with uint8 targets holding 0 and 255: every class is valid, none is ignored,
    through the nn modules too; a target the dtype holds outside [0, V) still raises."""
    wide = torch.tensor([0, 255, 128, 1, 254, 0])
    x = torch.randn(6, 8)
    head = LinearCrossEntropy(8, BYTE_VOCAB)
    logits = head.weight.detach() @ x.T
    want = F.cross_entropy(logits.T.double(), wide)
    with gptfast.use_backend(backend):
        got_logits = CrossEntropyLoss()(logits.T.contiguous(), wide.to(torch.uint8))
        got_linear = head(x, wide.to(torch.uint8))
        torch.testing.assert_close(got_logits.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_linear.double(), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"class index 200, outside \[0, 200\)"):
            gptfast.cross_entropy(torch.randn(2, 200), torch.tensor([5, 200], dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"class index -3, outside \[0, 9\) and not "
                                             r"ignore_index=253"):
            gptfast.cross_entropy(torch.randn(2, 9), torch.tensor([5, -3], dtype=torch.int8),
                                  ignore_index=253)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int32_targets_with_ignore_index_beyond_int32_keep_class_zero(backend):
    """2**32 wrapped into int32 is 0: class 0 must still count in the mean."""
    wide = torch.tensor([0, 4, 0, 2])
    logits = torch.randn(4, 5)
    with gptfast.use_backend(backend):
        for reduction in ("mean", "none"):
            want = F.cross_entropy(logits.double(), wide, reduction=reduction)
            got = gptfast.cross_entropy(logits, wide.int(), ignore_index=2**32,
                                        reduction=reduction)
            got_module = CrossEntropyLoss(ignore_index=2**32, reduction=reduction)(logits,
                                                                                   wide.int())
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_module.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bool_targets_are_a_type_error(backend):
    """A bool tensor is not class indices (True would silently be class 1)."""
    target = torch.tensor([True, False, True])
    with gptfast.use_backend(backend):
        for call in (lambda: gptfast.cross_entropy(torch.randn(3, 4), target),
                     lambda: gptfast.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2),
                                                          target),
                     lambda: CrossEntropyLoss()(torch.randn(3, 4), target),
                     lambda: LinearCrossEntropy(2, 4)(torch.randn(3, 2), target)):
            with pytest.raises(TypeError, match="target must be an integer tensor"):
                call()


# ---------------------------------------------------------------------------------- GPU --
# conftest turns the interpreter on by default; these tests are about the compiled kernels.
compiled_kernels = pytest.mark.skipif(
    gptfast.backend.interpreter_enabled(),
    reason="TRITON_INTERPRET=1 would interpret the kernels: run `pytest -m gpu` on a CUDA machine")


def _gpu_logits(rows, vocab, dtype=torch.bfloat16):
    return (torch.randn(rows, vocab, device="cuda") * 2).to(dtype)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [50257, 128256, 7])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.usefixtures("triton_backend")
def test_gpu_cross_entropy_matches_reference(dtype, vocab, reduction):
    rows = 4096 if vocab > 7 else 333
    values = _gpu_logits(rows, vocab, dtype)
    target = make_target(rows, vocab).cuda()
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    grad = torch.rand(rows, device="cuda") + 0.5 if reduction == "none" else torch.tensor(1.0, device="cuda")
    leaf = values.float().requires_grad_()
    want = reference.cross_entropy(leaf, target, **options)
    (want_grad,) = torch.autograd.grad(want, leaf, grad)
    logits = values.clone().requires_grad_() * 1
    loss = gptfast.cross_entropy(logits, target, **options)
    (got_grad,) = torch.autograd.grad(loss, logits, grad)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_grad.float(), want_grad, atol=2e-2 / rows if reduction == "mean" else 2e-2,
                               rtol=2e-2)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.usefixtures("triton_backend")
def test_gpu_cross_entropy_in_place_extra_memory_is_o_of_rows():
    rows, vocab = 16384, 50257
    leaf = _gpu_logits(rows, vocab).requires_grad_()
    target = make_target(rows, vocab).cuda()
    with ce.logits_policy("overwrite"):
        gptfast.cross_entropy(leaf, target).backward()  # warm-up: compile the kernels
        leaf.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = gptfast.cross_entropy(leaf, target)
        loss.backward()
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 1 << 20, extra
    assert leaf.grad.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr()


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("triton_backend")
def test_gpu_linear_cross_entropy_full_size(dtype):
    rows, hidden, vocab = 16384, 768, 50257
    x = torch.randn(rows, hidden, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, device="cuda") / 30).to(dtype).requires_grad_()
    target = make_target(rows, vocab).cuda()
    gptfast.linear_cross_entropy(x, weight, target).backward()  # warm-up
    x.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = gptfast.linear_cross_entropy(x, weight, target)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 300e6, extra
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = reference.linear_cross_entropy(x32, w32, target)
    want.backward()
    torch.testing.assert_close(loss, want, atol=2e-3, rtol=2e-3)
    for got, ref in ((x.grad, x32.grad), (weight.grad, w32.grad)):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, err


@pytest.mark.gpu
@compiled_kernels
def test_gpu_fp32_accumulating_matmul():
    a = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    accumulator = torch.full((4096, 256), 1000.0, device="cuda")
    ce._accumulate_matmul_fp32(accumulator, a, b)
    torch.testing.assert_close(accumulator, 1000.0 + a.double() @ b.double(), atol=1e-2, rtol=0,
                               check_dtype=False)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.usefixtures("triton_backend")
def test_gpu_inductor_compile_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(5003, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = make_target(1024, 5003).cuda().view(4, 256)
    for fn in (lambda: ce.cross_entropy(x @ weight.t(), target, reduction="none"),
               lambda: ce.linear_cross_entropy(x, weight, target, reduction="none")):
        grad = torch.rand(4, 256, device="cuda")
        eager = fn()
        eager_grads = torch.autograd.grad(eager, (x, weight), grad)
        compiled = torch.compile(fn, fullgraph=True)()
        compiled_grads = torch.autograd.grad(compiled, (x, weight), grad)
        torch.testing.assert_close(compiled, eager)
        for got, want in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_keep_logits_through_the_public_api(triton_backend):
    """gptfast.cross_entropy(..., keep_logits=True) leaves op-made logits intact, with equal grads."""
    x = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(37, 16)
    target = torch.randint(0, 37, (9,))
    target[3] = -100
    grads = []
    for keep in (None, True, False):
        x.grad = None
        logits = x @ weight.T
        before = logits.detach().clone()
        if keep is None:  # the default keeps them
            loss = gptfast.cross_entropy(logits, target)
        else:
            loss = gptfast.cross_entropy(logits, target, keep_logits=keep)
        assert torch.equal(logits.detach(), before) == (keep is not False)
        loss.backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])
    with pytest.raises(TypeError, match="keep_logits must be a bool"):
        gptfast.cross_entropy(logits, target, keep_logits="yes")
