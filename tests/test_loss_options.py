"""Liger's loss options on both backends: softcap, per-class weight, return_z_loss, and
linear_cross_entropy with an fp32 weight under bf16/fp16 activations.

The reference is checked against torch (F.cross_entropy with weight and label smoothing in
fp64, torch.tanh capping, autocast's F.linear); the Triton kernels (interpreter on CPU) are
checked against the reference in fp64, values and gradients, with odd N and V.
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import gptfast
from gptfast import reference
from gptfast.nn import CrossEntropyLoss, LinearCrossEntropy
from gptfast.testing import bf16_tolerance

ce = pytest.importorskip("gptfast.kernels.cross_entropy")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}
TOL[torch.bfloat16] = bf16_tolerance(TOL[torch.float16])
N, V = 13, 37  # odd, not a multiple of any block


def make_target(rows, vocab, ignore_index=-100):
    target = torch.randint(0, vocab, (rows,))
    target[1::4] = ignore_index
    return target


def class_weights(vocab):
    return torch.rand(vocab, dtype=torch.float64) * 2 + 0.1


def upstream(reduction, rows):
    return torch.rand(rows) + 0.5 if reduction == "none" else torch.tensor(1.7)


def loss_of(out):
    return out[0] if isinstance(out, tuple) else out


def assert_close(got, want, dtype, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(got.double(), want.double(), **tol)


def reference_run(values, target, grad, **options):
    """Reference outputs and d(loss)/d(logits) in fp64 (weights promoted too)."""
    leaf = values.detach().double().requires_grad_()
    if options.get("weight") is not None:
        options = dict(options, weight=options["weight"].double())
    out = reference.cross_entropy(leaf, target, **options)
    (dlogits,) = torch.autograd.grad(loss_of(out), leaf, grad.double())
    return out, dlogits


def triton_run(values, target, grad, keep_logits, **options):
    logits = values.clone().requires_grad_() * 1  # a non-leaf: keep_logits=False overwrites it
    if options.get("weight") is not None:
        options = dict(options, weight=options["weight"].float())
    with gptfast.use_backend("triton"):
        out = gptfast.cross_entropy(logits, target, keep_logits=keep_logits, **options)
    (dlogits,) = torch.autograd.grad(loss_of(out), logits, grad)
    return out, dlogits


# ------------------------------------------------------------- the reference against torch --

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_class_weight_matches_torch_in_fp64(reduction, label_smoothing):
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    target, weight = make_target(N, V), class_weights(V)
    want = F.cross_entropy(logits, target, weight=weight, reduction=reduction,
                           label_smoothing=label_smoothing)
    with gptfast.use_backend("reference"):
        got = gptfast.cross_entropy(logits, target, reduction=reduction,
                                    label_smoothing=label_smoothing, weight=weight)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    grad = upstream(reduction, N).double()
    torch.testing.assert_close(torch.autograd.grad(got, logits, grad)[0],
                               torch.autograd.grad(want, logits, grad)[0], atol=1e-12, rtol=1e-12)


def test_softcap_and_z_loss_are_computed_on_the_capped_logits():
    logits = torch.randn(N, V, dtype=torch.float64) * 20
    target, cap = make_target(N, V), 15.0
    capped = cap * torch.tanh(logits / cap)
    want = F.cross_entropy(capped, target, label_smoothing=0.1)
    lse_square = torch.logsumexp(capped, -1).square()[target != -100].mean()
    got, z_term = reference.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3,
                                          softcap=cap, return_z_loss=True)
    torch.testing.assert_close(z_term, 1e-3 * lse_square)
    torch.testing.assert_close(got, want + 1e-3 * lse_square)
    assert not z_term.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_z_loss_is_liger_s_term_and_leaves_the_loss_unchanged(reduction):
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    target, z = make_target(N, V), 1e-2
    loss, z_term = reference.cross_entropy(logits, target, reduction=reduction, z_loss=z,
                                           return_z_loss=True)
    kept = target != -100
    per_row = torch.where(kept, z * torch.logsumexp(logits, -1).square(), 0.0).detach()
    want_z = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / kept.sum()}[reduction]
    torch.testing.assert_close(z_term, want_z)
    torch.testing.assert_close(loss, reference.cross_entropy(logits, target, reduction=reduction,
                                                             z_loss=z))
    # class weights weight the cross-entropy part only: z_term is the same with them
    _, weighted_z = reference.cross_entropy(logits, target, reduction=reduction, z_loss=z,
                                            weight=class_weights(V), return_z_loss=True)
    torch.testing.assert_close(weighted_z, want_z)


def test_mixed_dtype_reference_equals_autocast():
    """Liger's AMP test: bf16 activations, fp32 lm_head, as F.linear under autocast."""
    x = torch.randn(N, 16).bfloat16()
    weight, bias = torch.randn(V, 16, requires_grad=True), torch.randn(V, requires_grad=True)
    target = make_target(N, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(x, weight, bias).float(), target)
    with gptfast.use_backend("reference"):
        got = gptfast.linear_cross_entropy(x, weight, target, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, (weight, bias)), torch.autograd.grad(want, (weight, bias))):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------ Triton against the reference --

OPTION_SETS = {
    "softcap": dict(softcap=2.0),
    "weight": dict(weight=class_weights(V)),
    "weight+smoothing": dict(weight=class_weights(V), label_smoothing=0.2),
    "z+return": dict(z_loss=1e-2, return_z_loss=True),
    "all": dict(weight=class_weights(V), label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
                return_z_loss=True),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("keep_logits", [True, False])
def test_cross_entropy_options_match_reference(name, reduction, keep_logits):
    options = dict(OPTION_SETS[name], reduction=reduction)
    values, target = torch.randn(N, V) * 4, make_target(N, V)
    grad = upstream(reduction, N)
    want, want_grad = reference_run(values, target, grad, **options)
    got, got_grad = triton_run(values, target, grad, keep_logits, **options)
    assert isinstance(got, tuple) == bool(options.get("return_z_loss"))
    scale = 10 if reduction == "sum" else 1
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert_close(g, w, torch.float32, scale)
    assert_close(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_options_combined_above_one_block(dtype):
    """softcap + smoothing + weight + ignore_index + z-loss at V above the interpreter's 2048."""
    rows, vocab = 5, 2053
    values = (torch.randn(rows, vocab) * 8).to(dtype)
    target = torch.tensor([7, -1, 2052, 0, 1999])
    options = dict(weight=class_weights(vocab), label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                   ignore_index=-1, return_z_loss=True)
    grad = torch.tensor(0.5)
    want, want_grad = reference_run(values, target, grad, **options)
    got, got_grad = triton_run(values, target, grad, False, **options)
    assert got_grad.dtype == dtype
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    assert_close(got_grad, want_grad, dtype)


def test_large_logits_under_softcap_stay_finite_with_exact_gradients():
    """Logits far past the cap saturate at +-cap with vanishing but exact gradients."""
    values = torch.tensor([[1e4, -1e4, 3.0, 0.0, -2.5, 1e-6, -1e-4]])
    target = torch.tensor([2])
    want, want_grad = reference_run(values, target, torch.tensor(1.0), softcap=4.0)
    got, got_grad = triton_run(values, target, torch.tensor(1.0), True, softcap=4.0)
    assert torch.isfinite(got_grad).all()
    assert_close(got, want, torch.float32)
    assert_close(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_weighted_mean_over_zero_total_weight_is_zero(backend, label_smoothing):
    """As for a mean over zero rows (README): 0 and zero gradients, where torch gives NaN."""
    logits = (torch.randn(4, 6) * 1).requires_grad_()
    target = torch.tensor([1, -100, 1, 3])
    weight = torch.ones(6)
    weight[[1, 3]] = 0.0
    with gptfast.use_backend(backend):
        loss = gptfast.cross_entropy(logits * 1, target, weight=weight,
                                     label_smoothing=label_smoothing)
        loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_softcap_none_is_the_plain_loss(backend):
    values, target = torch.randn(N, V), make_target(N, V)
    with gptfast.use_backend(backend):
        plain = gptfast.cross_entropy(values, target, label_smoothing=0.1)
        with_none = gptfast.cross_entropy(values, target, label_smoothing=0.1, softcap=None)
    assert torch.equal(plain, with_none)


def test_without_grad_the_options_give_the_same_values():
    values, target = torch.randn(N, V), make_target(N, V)
    options = dict(OPTION_SETS["all"], reduction="none")
    want, _ = reference_run(values, target, torch.ones(N), **options)
    with gptfast.use_backend("triton"), torch.no_grad():
        got = gptfast.cross_entropy(values, target, **dict(options, weight=options["weight"].float()))
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


# ------------------------------------------------------------------ linear_cross_entropy --

def linear_run(backend, x, weight, bias, target, grad, **options):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    if backend == "fp64":
        leaves = [t.double().detach().requires_grad_() if t is not None else None for t in leaves]
        if options.get("ce_weight") is not None:
            options = dict(options, ce_weight=options["ce_weight"].double())
        out = reference.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], **options)
    else:
        if options.get("ce_weight") is not None:
            options = dict(options, ce_weight=options["ce_weight"].float())
        with gptfast.use_backend(backend):
            out = gptfast.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], **options)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(loss_of(out), present, grad.to(loss_of(out).dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("x_dtype,weight_dtype", [(torch.float32, torch.float32),
                                                  (torch.float16, torch.float32),
                                                  (torch.float16, torch.float16),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_linear_cross_entropy_options_match_reference(monkeypatch, reduction, x_dtype,
                                                      weight_dtype):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 8)  # 29 rows: 3 full chunks and one of 5
    rows, hidden, vocab = 29, 12, 41
    # values exact in the half dtype, so casting the weight for the GEMM rounds nothing
    half = torch.bfloat16 if x_dtype == torch.bfloat16 else torch.float16
    x = torch.randn(rows, hidden).to(half).to(x_dtype)
    weight = (torch.randn(vocab, hidden) / 3).to(half).to(weight_dtype)
    bias = torch.randn(vocab).to(half).to(weight_dtype)
    target = make_target(rows, vocab)
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=2.5,
                   ce_weight=class_weights(vocab), return_z_loss=True)
    grad = upstream(reduction, rows)
    want, want_grads = linear_run("fp64", x, weight, bias, target, grad, **options)
    got, got_grads = linear_run("triton", x, weight, bias, target, grad, **options)
    scale = 10 if reduction == "sum" else 1
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert_close(g, w, x_dtype, scale)
    for g, w, dtype in zip(got_grads, want_grads, (x_dtype, weight_dtype, weight_dtype)):
        assert g.dtype == dtype  # grad of x in x's dtype, of weight and bias in theirs
        assert_close(g, w, x_dtype, scale=5)


def test_linear_mixed_dtype_weight_gradient_is_not_rounded_to_fp16(monkeypatch):
    """An fp32 weight's gradient is accumulated over the row chunks in fp32 and returned in
    fp32: it holds values an fp16 gradient could not (autocast's F.linear rounds it to fp16)."""
    monkeypatch.setattr(ce, "CHUNK_ROWS", 4)
    rows, hidden, vocab = 16, 8, 11
    x = torch.randn(rows, hidden).half()
    weight = torch.randn(vocab, hidden).half().float()
    target = make_target(rows, vocab)
    _, (_, want) = linear_run("fp64", x, weight, None, target, torch.tensor(1.0))
    _, (_, got) = linear_run("triton", x, weight, None, target, torch.tensor(1.0))
    assert got.dtype == torch.float32
    assert (got != got.half().float()).any()
    assert_close(got, want, torch.float16)


def test_linear_double_backward_with_options_matches_reference():
    x = torch.randn(7, 6, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(9, 6, requires_grad=True)
    target = make_target(7, 9)
    options = dict(ce_weight=torch.rand(9) + 0.5, softcap=2.0, z_loss=1e-2, label_smoothing=0.1)
    results = []
    for backend in ("reference", "triton"):
        with gptfast.use_backend(backend):
            loss = gptfast.linear_cross_entropy(x, weight, target, **options)
            (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
            results.append(torch.autograd.grad(grad_x.square().sum(), weight))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep_logits", [True, False])
def test_cross_entropy_double_backward_with_options(keep_logits):
    """Kept logits: exact second derivatives (softcap's included); overwritten: a clear error."""
    x = torch.randn(6, 5, requires_grad=True)
    head = torch.randn(11, 5)
    target = torch.tensor([0, 3, -100, 10, 4, 4])
    options = dict(weight=torch.rand(11) + 0.5, softcap=1.5, z_loss=1e-2, label_smoothing=0.1,
                   keep_logits=keep_logits)
    with gptfast.use_backend("reference"):
        (first,) = torch.autograd.grad(gptfast.cross_entropy(x @ head.t(), target, **options), x,
                                       create_graph=True)
        want = torch.autograd.grad(first.square().sum(), x)[0]
    with gptfast.use_backend("triton"):
        (grad_x,) = torch.autograd.grad(gptfast.cross_entropy(x @ head.t(), target, **options),
                                        x, create_graph=True)
    if keep_logits:
        torch.testing.assert_close(torch.autograd.grad(grad_x.square().sum(), x)[0], want,
                                   atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(grad_x, first, atol=1e-5, rtol=1e-4)  # values are right
        with pytest.raises(RuntimeError, match="does not support double backward"):
            grad_x.square().sum().backward()


# ---------------------------------------------------------------------------- modules --

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_modules_carry_the_options(backend):
    torch.manual_seed(0)
    class_weight = torch.rand(V) + 0.5
    loss_fn = CrossEntropyLoss(weight=class_weight, softcap=3.0, z_loss=1e-3, return_z_loss=True)
    head = LinearCrossEntropy(8, V, ce_weight=class_weight, softcap=3.0, z_loss=1e-3,
                              return_z_loss=True)
    assert "weight" in dict(loss_fn.named_buffers()) and "ce_weight" in dict(head.named_buffers())
    x, target = torch.randn(N, 8), make_target(N, V)
    with gptfast.use_backend(backend):
        loss, z_term = loss_fn(x @ head.weight.t(), target)
        fused, fused_z = head(x, target)
    want, want_z = reference.cross_entropy(x @ head.weight.t(), target, weight=class_weight,
                                           softcap=3.0, z_loss=1e-3, return_z_loss=True)
    for got in (loss, fused):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got in (z_term, fused_z):
        torch.testing.assert_close(got, want_z, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ torch.compile --

def test_options_compile_without_graph_breaks():
    """The custom ops carry the new arguments: one graph, the reference's numbers."""
    class_weight, target = torch.rand(V) + 0.5, make_target(N, V)
    head = torch.randn(V, 8, requires_grad=True)

    def losses(x, head):
        loss, z_term = gptfast.cross_entropy(torch.tanh(x) @ head.t(), target,
                                             weight=class_weight, softcap=2.0, z_loss=1e-3,
                                             label_smoothing=0.1, return_z_loss=True)
        fused = gptfast.linear_cross_entropy(torch.tanh(x), head, target, ce_weight=class_weight,
                                             softcap=2.0, z_loss=1e-3)
        return loss + fused + 0.0 * z_term

    x = torch.randn(N, 8, requires_grad=True)
    with gptfast.use_backend("reference"):
        want = losses(x, head)
        want_grads = torch.autograd.grad(want, (x, head))
    torch._dynamo.reset()
    with gptfast.use_backend("triton"):
        explained = torch._dynamo.explain(losses)(x, head)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_count == 1
        torch._dynamo.reset()
        got = torch.compile(losses, fullgraph=True, backend="aot_eager")(x, head)
    got_grads = torch.autograd.grad(got, (x, head))
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- bad input --

@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_bad_options_name_the_argument(backend):
    logits, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    x, weight = torch.randn(4, 5), torch.randn(6, 5)
    cases = [
        (ValueError, "softcap must be > 0", dict(softcap=0.0)),
        (ValueError, "softcap must be > 0", dict(softcap=-1.0)),
        (ValueError, "softcap must be a finite number", dict(softcap=float("inf"))),
        (ValueError, "softcap must be a finite number", dict(softcap=float("nan"))),
        (TypeError, "softcap must be a number", dict(softcap="30")),
        (TypeError, "softcap must be a number", dict(softcap=True)),
        (TypeError, "return_z_loss must be a bool", dict(return_z_loss=1)),
    ]
    for error, match, options in cases:
        with gptfast.use_backend(backend):
            with pytest.raises(error, match=match):
                gptfast.cross_entropy(logits, target, **options)
            with pytest.raises(error, match=match):
                gptfast.linear_cross_entropy(x, weight, target, **options)
    weight_cases = [
        (ValueError, r"must have shape \(6,\)", torch.ones(5)),
        (ValueError, r"must have shape \(6,\)", torch.ones(1, 6)),
        (TypeError, "must be a floating-point tensor", torch.ones(6, dtype=torch.int64)),
        (TypeError, "must be a torch.Tensor", [1.0] * 6),
        (ValueError, "is on meta", torch.ones(6, device="meta")),
        (ValueError, "must not require grad", torch.ones(6, requires_grad=True)),
    ]
    for error, match, bad in weight_cases:
        with gptfast.use_backend(backend):
            with pytest.raises(error, match=match):
                gptfast.cross_entropy(logits, target, weight=bad)
            with pytest.raises(error, match=match):
                gptfast.linear_cross_entropy(x, weight, target, ce_weight=bad)
    with gptfast.use_backend(backend):
        with pytest.raises(TypeError, match="weight must have x's dtype torch.float32"):
            gptfast.linear_cross_entropy(x, weight.half(), target)
        with pytest.raises(TypeError, match="weight must have x's dtype torch.float16"):
            gptfast.linear_cross_entropy(x.half(), weight.double(), target)
        with pytest.raises(TypeError, match="bias must have weight's dtype torch.float32"):
            gptfast.linear_cross_entropy(x.half(), weight, target, torch.zeros(6).half())


# ---------------------------------------------------------------------------------- GPU --
compiled_kernels = pytest.mark.skipif(
    gptfast.backend.interpreter_enabled(),
    reason="TRITON_INTERPRET=1 would interpret the kernels: run `pytest -m gpu` on a CUDA machine")


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("triton_backend")
def test_gpu_cross_entropy_options_full_vocab(dtype):
    rows, vocab = 2048, 50257
    values = (torch.randn(rows, vocab, device="cuda") * 20).to(dtype)
    target = make_target(rows, vocab).cuda()
    options = dict(weight=torch.rand(vocab, device="cuda") + 0.5, label_smoothing=0.1,
                   z_loss=1e-4, softcap=30.0, return_z_loss=True)
    leaf = values.float().requires_grad_()
    want, want_z = reference.cross_entropy(leaf, target, **options)
    (want_grad,) = torch.autograd.grad(want, leaf)
    logits = values.clone().requires_grad_() * 1
    loss, z_term = gptfast.cross_entropy(logits, target, keep_logits=False, **options)
    (got_grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_term, want_z, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad.float(), want_grad, atol=2e-2 / rows, rtol=2e-2)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("triton_backend")
def test_gpu_linear_cross_entropy_fp32_weight_under_autocast(dtype):
    """Liger's AMP case: half activations, an fp32 lm_head, autocast on; fp32 weight grads."""
    rows, hidden, vocab = 4096, 768, 50257
    x = torch.randn(rows, hidden, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, device="cuda") / 30).requires_grad_()
    target = make_target(rows, vocab).cuda()
    with torch.autocast("cuda", dtype=dtype):
        loss = gptfast.linear_cross_entropy(x, weight, target, softcap=30.0)
    loss.backward()
    assert x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().to(dtype).float().requires_grad_()
    want = reference.linear_cross_entropy(x32, w32, target, softcap=30.0)
    want.backward()
    torch.testing.assert_close(loss, want, atol=2e-3, rtol=2e-3)
    for got, ref in ((x.grad, x32.grad), (weight.grad, w32.grad)):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, err
