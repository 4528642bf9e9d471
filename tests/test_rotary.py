"""The Triton rotary + QK RMSNorm kernel against gptfast.reference computed in fp64.

On CPU the kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1 and
turns on the bf16 shim), so shapes stay small. Every case checks the outputs and the
gradients of q and k.
"""

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast import reference, testing

triton = pytest.importorskip("triton")
rotary = pytest.importorskip("gptfast.kernels.rotary")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (rtol, atol): outputs are O(scale), rounded once to the dtype; bf16 by the shared rule
TOL = {F32: (2e-5, 2e-5), F16: (4e-3, 4e-3)}
TOL[BF16] = testing.bf16_tolerance(TOL[F16])


def _close(got, want, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale)


def _tables(t, d, dtype=F32, base=100.0):
    """cos, sin (t, d/2) of the usual frequencies, with positions spread over many turns."""
    inv_freq = base ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float64) * 7.3 + 0.4, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _run(q, k, cos, sin, upstream=None, **options):
    """((q', k', dq, dk) on the Triton backend, the same from the fp64 reference).

    q and k are used as given (views included); their gradients are taken with respect to
    ``leaves`` (q and k themselves, or the tensors they are views of, see _run_views)."""
    return _run_views(lambda q_, k_: (q_, k_), (q, k), cos, sin, upstream, **options)


def _run_views(make, bases, cos, sin, upstream=None, **options):
    leaves = [b.detach().clone().requires_grad_() for b in bases]
    with gptfast.use_backend("triton"):
        qo, ko = gptfast.rotary_qk_norm(*make(*leaves), cos, sin, **options)
    if upstream is None:
        upstream = (torch.randn(qo.shape), torch.randn(ko.shape))
    grads = torch.autograd.grad((qo, ko), leaves, [u.to(o.dtype) for u, o in zip(upstream, (qo, ko))],
                                allow_unused=True)
    leaves64 = [b.detach().double().requires_grad_() for b in bases]
    eps = options.pop("eps", None)
    q64, k64 = make(*leaves64)
    # eps=None is torch's default for the kernel's dtypes, not fp64's (the oracle's)
    eps_q = reference.default_rms_eps(qo.dtype) if eps is None else eps
    eps_k = reference.default_rms_eps(ko.dtype) if eps is None else eps
    qo64 = reference.rotary_qk_norm(q64, q64, cos.double(), sin.double(), eps=eps_q, **options)[0]
    ko64 = reference.rotary_qk_norm(k64, k64, cos.double(), sin.double(), eps=eps_k, **options)[1]
    grads64 = torch.autograd.grad((qo64, ko64), leaves64, [u.double() for u in upstream],
                                  allow_unused=True)
    return (qo, ko, *grads), (qo64, ko64, *grads64)


def _qk(b, t, h, hkv, d, dtype, magnitude=1.0):
    return ((torch.randn(b, t, h, d) * magnitude).to(dtype),
            (torch.randn(b, t, hkv, d) * magnitude).to(dtype))


# (B, T, H, Hkv, D): GQA, MQA (Hkv=1), T=1, head dims not a power of two (6, 48) and D=2
SHAPES = [(2, 3, 4, 2, 8), (1, 1, 3, 3, 6), (2, 4, 3, 1, 48), (1, 2, 1, 1, 2), (1, 2, 5, 5, 64)]


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_matches_reference(shape, dtype, interleaved):
    b, t, h, hkv, d = shape
    q, k = _qk(b, t, h, hkv, d, dtype, magnitude=3.0)
    cos, sin = _tables(t, d)
    got, want = _run(q, k, cos, sin, interleaved=interleaved)
    qo, ko, dq, dk = got
    assert qo.shape == q.shape and ko.shape == k.shape
    assert qo.dtype == dq.dtype == ko.dtype == dk.dtype == dtype
    assert qo.is_contiguous() and ko.is_contiguous()
    for g, w in zip(got, want):
        _close(g, w, dtype)


@pytest.mark.parametrize("scale", [1.2, -0.5, 0.0])
def test_scale_multiplies_outputs_and_gradients(scale):
    q, k = _qk(2, 3, 4, 2, 16, F32)
    cos, sin = _tables(3, 16)
    got, want = _run(q, k, cos, sin, scale=scale)
    for g, w in zip(got, want):
        _close(g, w, F32)
    if scale == 0.0:
        assert all(torch.equal(g, torch.zeros_like(g)) for g in got)


def test_eps_given_and_default():
    """Rows of mean square ~eps: the answer depends on eps, so a kernel that drops or
    mixes up eps fails against the reference with the same eps."""
    q, k = _qk(1, 3, 2, 1, 16, F16, magnitude=0.03)  # mean x^2 ~ 1e-3 ~ fp16's eps
    cos, sin = _tables(3, 16)
    default, default64 = _run(q, k, cos, sin)
    given, given64 = _run(q, k, cos, sin, eps=1e-2)
    for g, w in zip(default + given, default64 + given64):  # gradients ~ 1 / |x| ~ 30
        _close(g, w, F16, scale=w.abs().max().item())
    assert (default[0].double() - given[0].double()).abs().max() > 0.1
    # eps=None is torch's default for each tensor: fp16 q, fp32 k
    got, want = _run(q, k.float(), cos, sin)
    for g, w, dtype in zip(got, want, (F16, F32, F16, F32)):
        _close(g, w, dtype, scale=w.abs().max().item())


def test_cos_sin_dtypes_and_strided_tables():
    """bf16 tables (as nanochat keeps them) and a slice of a longer, padded table."""
    q, k = _qk(2, 4, 2, 2, 12, F32)
    long_cos, long_sin = _tables(10, 12)
    padded = torch.zeros(10, 8, dtype=F32)  # (T, D/2) inside wider rows: row stride 8
    cos = padded.clone()[:, :6].copy_(long_cos)[3:7]
    sin = padded.clone()[:, :6].copy_(long_sin)[3:7]
    assert cos.stride() == (8, 1)
    got, want = _run(q, k, cos, sin)
    for g, w in zip(got, want):
        _close(g, w, F32)
    cos16, sin16 = long_cos[:4].to(BF16), long_sin[:4].to(BF16)
    got, want = _run(q, k, cos16, sin16)
    for g, w in zip(got, want):
        _close(g, w, F32)


def _linear_qkv(b, t, h, hkv, d):
    return torch.randn(b, t, (h + 2 * hkv) * d)


@pytest.mark.parametrize("layout", ["fused_3hd", "fused_heads", "bhtd", "transposed_d"])
def test_strided_views_read_in_place(layout, monkeypatch):
    """q and k as views of a fused qkv projection (or other strided layouts): the kernel
    reads them where they are (no copy), and gradients reach the fused tensor."""
    b, t, h, hkv, d = 2, 3, 4, 2, 8
    if layout == "fused_3hd":  # (B, T, 3 * H * D) -> (B, T, 3, H, D), split on dim 2
        base = torch.randn(b, t, 3 * h * d)

        def make(x):
            qkv = x.view(b, t, 3, h, d)
            return qkv[:, :, 0], qkv[:, :, 1]
    elif layout == "fused_heads":  # GQA: (B, T, H + 2 Hkv, D) split along heads
        base = _linear_qkv(b, t, h, hkv, d)

        def make(x):
            heads = x.view(b, t, h + 2 * hkv, d)
            return heads[:, :, :h], heads[:, :, h:h + hkv]
    elif layout == "bhtd":  # (B, H, T, D) storage seen as (B, T, H, D)
        base = torch.randn(b, h + hkv, t, d)

        def make(x):
            return x[:, :h].transpose(1, 2), x[:, h:].transpose(1, 2)
    else:  # head dim not unit-stride
        base = torch.randn(b, t, d, h + hkv)

        def make(x):
            return x[..., :h].transpose(2, 3), x[..., h:].transpose(2, 3)
    q_view, k_view = make(base)
    assert not q_view.is_contiguous()
    copies = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **kw: copies.append(self.shape) or real_contiguous(self, *a, **kw))
    cos, sin = _tables(t, d)
    (qo, ko, dbase), (qo64, ko64, dbase64) = _run_views(make, (base,), cos, sin)
    assert copies == []
    for g, w in ((qo, qo64), (ko, ko64), (dbase, dbase64)):
        _close(g, w, F32)


def test_q_and_k_with_different_layouts():
    """q a view of a fused projection, k a separate tensor in (B, Hkv, T, D) storage: each
    tensor's own strides, not the other's."""
    b, t, h, hkv, d = 2, 3, 4, 2, 8
    fused, k_bhtd = torch.randn(b, t, 3 * h * d), torch.randn(b, hkv, t, d)

    def make(x, kx):
        return x.view(b, t, 3, h, d)[:, :, 0], kx.transpose(1, 2)
    cos, sin = _tables(t, d)
    got, want = _run_views(make, (fused, k_bhtd), cos, sin)
    for g, w in zip(got, want):
        _close(g, w, F32)


def test_upstream_gradients_of_any_strides():
    """dq', dk' as autograd hands them over: expanded (stride 0, from .sum()) or transposed."""
    q, k = _qk(2, 3, 4, 2, 8, F32)
    cos, sin = _tables(3, 8)
    transposed = (torch.randn(2, 3, 8, 4).transpose(-1, -2), torch.randn(2, 2, 3, 8).transpose(1, 2))
    expanded = (torch.tensor(1.5).expand(2, 3, 4, 8), torch.tensor(-0.5).expand(2, 3, 2, 8))
    for upstream in (transposed, expanded):
        got, want = _run(q, k, cos, sin, upstream=upstream)
        for g, w in zip(got, want):
            _close(g, w, F32)


def _nanochat_rotary(x, cos, sin):
    """nanochat's convention, written from its description: rotation by -theta."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c + x2 * s, x1 * (-s) + x2 * c], 3)


def test_nanochat_convention_is_negated_sin():
    """nanochat: rotary (by -theta), then F.rms_norm with its default eps, then * 1.2:
    gptfast.rotary_qk_norm(q, k, cos, -sin, scale=1.2), gradients included."""
    q, k = _qk(2, 5, 4, 2, 16, F32)
    cos, sin = _tables(5, 16)
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    with gptfast.use_backend("triton"):
        qo, ko = gptfast.rotary_qk_norm(*leaves, cos, -sin, scale=1.2)
    up = (torch.randn_like(qo), torch.randn_like(ko))
    dq, dk = torch.autograd.grad((qo, ko), leaves, up)
    leaves64 = [q.double().requires_grad_(), k.double().requires_grad_()]
    eps = torch.finfo(F32).eps  # F.rms_norm's default on nanochat's fp32 tensors
    nano = [1.2 * F.rms_norm(_nanochat_rotary(x, cos.double(), sin.double()), (16,), eps=eps)
            for x in leaves64]
    dq64, dk64 = torch.autograd.grad(nano, leaves64, [u.double() for u in up])
    for g, w in ((qo, nano[0]), (ko, nano[1]), (dq, dq64), (dk, dk64)):
        _close(g, w, F32)
    # and +sin is not nanochat's: the two differ
    with gptfast.use_backend("triton"):
        plus = gptfast.rotary_qk_norm(q, k, cos, sin, scale=1.2)[0]
    assert (plus.double() - nano[0]).abs().max() > 0.1


def test_gradient_of_one_input_or_one_output():
    q, k = _qk(2, 3, 2, 1, 8, F32)
    cos, sin = _tables(3, 8)
    qg = q.clone().requires_grad_()
    with gptfast.use_backend("triton"):
        qo, ko = gptfast.rotary_qk_norm(qg, k, cos, sin)
    assert qo.requires_grad and not ko.requires_grad
    up = torch.randn_like(qo)
    (dq,) = torch.autograd.grad(qo, qg, up)
    q64 = q.double().requires_grad_()
    qo64 = reference.rotary_qk_norm(q64, k.double(), cos.double(), sin.double(),
                                    eps=torch.finfo(F32).eps)[0]
    (dq64,) = torch.autograd.grad(qo64, q64, up.double())
    _close(dq, dq64, F32)
    # only k' reaches the loss: q's gradient is zero, k's is the reference's
    got, want = _run(q, k, cos, sin, upstream=(torch.zeros(q.shape), torch.randn(k.shape)))
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    with gptfast.use_backend("triton"):
        _, ko = gptfast.rotary_qk_norm(*leaves, cos, sin)
    dq, dk = torch.autograd.grad(ko, leaves, torch.ones_like(ko), allow_unused=True)
    assert dq is None or torch.equal(dq, torch.zeros_like(dq))
    _close(got[3], want[3], F32)


UNIT_ROUNDOFF = {F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}
# Rows by dtype: (magnitude of one head row); each tensor holds them side by side, one
# magnitude per head, so a statistic shared across heads or rows would show.
MAGNITUDES = {
    F32: [1e30, 1e-30, 0.0, 1.0, 3e37],
    F16: [1e4, 1e-4, 0.0, 1.0, 6e4],
    BF16: [1e30, 1e-30, 0.0, 1.0, 3e37],
}


def _edge_heads(dtype, b=1, t=2, d=12):
    heads = [torch.randn(b, t, 1, d, dtype=torch.float64) * m for m in MAGNITUDES[dtype]]
    heads[-1][..., 0] = MAGNITUDES[dtype][-1]  # one entry far above the rest of its row
    heads[-1][..., 1:] /= 1e3
    return torch.cat(heads, 2).to(dtype)


def _per_row_error(got, want):
    """max over head rows of max|got - want| / max|want| in that row (0/0 counts as 0)."""
    err = (got.double() - want.double()).abs().amax(-1)
    size = want.double().abs().amax(-1)
    return torch.where(size > 0, err / size.clamp(min=1e-300), err).max().item()


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_magnitude_edges(dtype):
    """Huge rows (x^2 beyond fp32), tiny rows, zero rows, one dominant entry: outputs and
    gradients within a few roundings of the dtype, relative to each row's own size (the
    gradients scale as 1 / |x|). The reference backend in fp32 gives 0 for the huge rows."""
    q, k = _edge_heads(dtype), _edge_heads(dtype)[:, :, 1:4]
    cos, sin = _tables(2, 12)
    got, want = _run(q, k, cos, sin, scale=1.5)
    for name, g, w in zip(("q'", "k'", "dq", "dk"), got, want):
        assert torch.isfinite(g).all(), name
        bound = 8 * UNIT_ROUNDOFF[dtype]
        assert _per_row_error(g, w) <= bound, (name, _per_row_error(g, w))
    assert torch.equal(got[0][:, :, 2], torch.zeros_like(got[0][:, :, 2]))  # the zero row


def test_double_backward_matches_reference():
    q, k = _qk(1, 3, 2, 1, 8, F32)
    cos, sin = _tables(3, 8)

    def penalty(backend):
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        with gptfast.use_backend(backend):
            qo, ko = gptfast.rotary_qk_norm(*leaves, cos, sin, scale=1.3)
            loss = (qo * torch.arange(8.0)).sum() + ko.square().sum() * 0 + (ko * 2).sum()
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            total = sum(g.square().sum() for g in grads)
            return torch.autograd.grad(total, leaves)

    for g, w in zip(penalty("triton"), penalty("reference")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_unsupported_cases_fall_back_or_raise():
    q, k = _qk(1, 2, 2, 1, 8, torch.float64)
    cos, sin = _tables(2, 8, torch.float64)
    assert "float64" in rotary.rotary_qk_norm_unsupported(q, k, cos, sin)
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable, match="float64"):
        gptfast.rotary_qk_norm(q, k, cos, sin)
    q, k = q.float(), k.float()
    cos = cos.float().requires_grad_()
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable, match="cos/sin"):
        gptfast.rotary_qk_norm(q, k, cos, sin.float())
    with torch.no_grad():  # no graph: the tables' requires_grad does not matter
        assert rotary.rotary_qk_norm_unsupported(q, k, cos, sin.float()) is None
    assert rotary.rotary_qk_norm_unsupported(q, k, cos.detach(), sin.float()) is None


def test_bad_input_raises_the_same_on_triton():
    q, k = _qk(1, 2, 2, 1, 8, F32)
    cos, sin = _tables(2, 8)
    with gptfast.use_backend("triton"):
        with pytest.raises(ValueError, match="head_dim must be even"):
            gptfast.rotary_qk_norm(q[..., :7], k[..., :7], cos[:, :3], sin[:, :3])
        with pytest.raises(ValueError, match="sin must have shape"):
            gptfast.rotary_qk_norm(q, k, cos, sin[:1])
        with pytest.raises(ValueError, match="k must have q's"):
            gptfast.rotary_qk_norm(q, k[:, :1], cos, sin)
        with pytest.raises(TypeError, match="interleaved"):
            gptfast.rotary_qk_norm(q, k, cos, sin, interleaved=1)
        with pytest.raises(ValueError, match="scale"):
            gptfast.rotary_qk_norm(q, k, cos, sin, scale=float("nan"))


def test_empty_batch():
    q, k = torch.randn(0, 3, 2, 8, requires_grad=True), torch.randn(0, 3, 1, 8, requires_grad=True)
    cos, sin = _tables(3, 8)
    with gptfast.use_backend("triton"):
        qo, ko = gptfast.rotary_qk_norm(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert qo.shape == q.shape and q.grad.shape == q.shape


def test_custom_ops_pass_opcheck():
    q, k = _qk(1, 2, 3, 1, 8, F32)
    cos, sin = _tables(2, 8)
    q.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(torch.ops.gptfast.rotary_qk_norm_fwd.default, (q, k, cos, sin, 1.2, None, True))
    dq = torch.randn(1, 2, 3, 8)
    torch.library.opcheck(torch.ops.gptfast.rotary_qk_norm_bwd.default,
                          (dq, None, q.detach(), k.detach(), cos, sin, 1.2, 1e-5, False, True, False))


def test_compile_fullgraph_runs_the_kernel(monkeypatch):
    import torch._dynamo

    calls = []
    launch = rotary.rotary_qk_norm_forward
    monkeypatch.setattr(rotary, "rotary_qk_norm_forward",
                        lambda *a: calls.append(1) or launch(*a))
    q, k = _qk(2, 3, 4, 2, 8, F32)
    cos, sin = _tables(3, 8)

    def loss(q, k):
        qo, ko = gptfast.rotary_qk_norm(q, k, cos, -sin, scale=1.2)
        return (qo * qo.detach().flip(-1)).sum() + (ko * 3).sum()

    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    with gptfast.use_backend("reference"):
        want = loss(*leaves)
        want_grads = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    try:
        with gptfast.use_backend("triton"):
            explained = torch._dynamo.explain(loss)(*leaves)
            assert explained.graph_break_count == 0 and explained.graph_count == 1
            torch._dynamo.reset()
            calls.clear()
            got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
            got_grads = torch.autograd.grad(got, leaves)
    finally:
        torch._dynamo.reset()
    assert calls, "the compiled function did not run the kernel"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
