"""The Triton RMSNorm kernels (rms_norm, add_rms_norm) against gptfast.reference in fp64.

The kernels are the LayerNorm kernels with CENTER off (kernels/layernorm.py), so this file
mirrors tests/test_layernorm.py and tests/test_layernorm_magnitudes.py: odd widths, leading
dims, no weight or an fp32 weight with half x, eps None (torch's default, fp32's epsilon for half x, as
F.rms_norm) or given, mixed dtypes in add_rms_norm, gradients, the looped variants (forced
with small thresholds), magnitude edges, bad input, custom ops under torch.compile. On CPU the
kernels run in the Triton interpreter (bf16 by value: conftest turns the shim on).
"""

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast import reference, testing

triton = pytest.importorskip("triton")
ln = pytest.importorskip("gptfast.kernels.layernorm")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (rtol, atol) by the lowest-precision dtype a result passed through; bf16 is fp16's scaled
# by gptfast.testing's rule (8x: 3 fewer mantissa bits).
TOL = {F32: (1e-5, 1e-5), F16: (5e-3, 5e-3)}
TOL[BF16] = testing.bf16_tolerance(TOL[F16])


def _close(actual, expected, *dtypes, scale=1.0):
    rtol, atol = max(TOL[d] for d in dtypes if d is not None)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def _leaf(t, requires_grad=True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def _fp64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _grads(*ts):
    return [None if t is None else t.grad for t in ts]


def _eps_of(dtype, eps):
    """What eps=None means: torch's, the epsilon of the dtype it computes in (fp32's for half
    input), not of fp64 (the oracle's)."""
    return reference.default_rms_eps(dtype) if eps is None else eps


def _run_rms_norm(x, w, eps=None):
    """(y, dx, dw) from gptfast.rms_norm, and the same from reference in fp64."""
    x, w = _leaf(x), _leaf(w)
    y = gptfast.rms_norm(x, w, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = _fp64(x, w)
    y64 = reference.rms_norm(x64, w64, _eps_of(x.dtype, eps))
    y64.backward(dy.double())
    return (y, *_grads(x, w)), (y64, *_grads(x64, w64))


SHAPES = [(37, 200), (2, 3, 97), (1, 64), (5, 1), (3, 1, 4097)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("weight", ["w", "none"])
def test_rms_norm_matches_reference(triton_backend, shape, dtype, weight):
    if shape[-1] == 4097 and dtype != F32:
        pytest.skip("the widest row runs once, in fp32 (interpreter time)")
    x = torch.randn(shape).to(dtype) * 3 + 1
    w = torch.randn(shape[-1]).to(dtype) if weight == "w" else None
    (y, dx, dw), (y64, dx64, dw64) = _run_rms_norm(x, w)
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype
    _close(y, y64, dtype)
    _close(dx, dx64, dtype)
    assert (dw is None) == (w is None)
    if w is not None:
        assert dw.dtype == dtype
        _close(dw, dw64, dtype, scale=(x.numel() // shape[-1]) ** 0.5)


@pytest.mark.parametrize("x_dtype,w_dtype", [(F16, F32), (BF16, F32), (F32, BF16)],
                         ids=["f16x-f32w", "bf16x-f32w", "f32x-bf16w"])
def test_rms_norm_mixed_weight_dtype(triton_backend, x_dtype, w_dtype):
    x = torch.randn(19, 160).to(x_dtype)
    w = torch.randn(160).to(w_dtype)
    (y, dx, dw), (y64, dx64, dw64) = _run_rms_norm(x, w, eps=1e-6)
    assert y.dtype == x_dtype and dx.dtype == x_dtype and dw.dtype == w_dtype
    _close(y, y64, x_dtype)
    _close(dx, dx64, x_dtype)
    _close(dw, dw64, x_dtype, w_dtype, scale=19 ** 0.5)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_eps_none_is_torchs_default(triton_backend, dtype):
    """Rows with a mean square of 1e-4, where bf16's eps (7.8e-3) or fp16's (9.8e-4) would
    change the result: eps=None must be what F.rms_norm does, the epsilon of fp32 (the dtype
    torch computes in), not of the input dtype as torch's docstring says."""
    x = (torch.randn(6, 50) * 1e-2).to(dtype)
    (y, dx, _), (y64, dx64, _) = _run_rms_norm(x, None, eps=None)
    _close(y, y64, dtype)
    _close(dx, dx64, dtype, scale=100)  # dx ~ 1 / sqrt(mean square + eps), up to ~100
    torch_default = F.rms_norm(x.float(), (50,)).to(dtype)
    _close(y, torch_default.double(), dtype)
    if dtype != F32:
        own_dtype_eps = reference.rms_norm(x.double(), None, torch.finfo(dtype).eps)
        assert (own_dtype_eps - y.double()).abs().max() > 0.1


def _force_looped(monkeypatch, forward=True):
    """Rows past MAX_FUSED_C (MAX_FUSED_BWD_C in backward) take the chunked kernels."""
    if forward:
        monkeypatch.setattr(ln, "MAX_FUSED_C", 512)
        monkeypatch.setattr(ln, "LOOP_BLOCK_C", 256)
    monkeypatch.setattr(ln, "MAX_FUSED_BWD_C", 512)
    monkeypatch.setattr(ln, "LOOP_BWD_BLOCK_C", 256)


@pytest.mark.parametrize("forward", [True, False], ids=["both-looped", "backward-looped"])
@pytest.mark.parametrize("weight", ["w", "none"])
def test_rms_norm_looped_variant(triton_backend, monkeypatch, forward, weight):
    _force_looped(monkeypatch, forward)
    for dtype in (F32, F16, BF16):
        x = torch.randn(5, 1000).to(dtype) * 2 + 5
        w = torch.randn(1000) if weight == "w" else None
        (y, dx, dw), (y64, dx64, dw64) = _run_rms_norm(x, w)
        _close(y, y64, dtype)
        _close(dx, dx64, dtype)
        if w is not None:
            _close(dw, dw64, dtype, scale=3)


def _run_add(x, r, w, eps=None, use=("y", "s")):
    x, r, w = _leaf(x), _leaf(r), _leaf(w)
    y, s = gptfast.add_rms_norm(x, r, w, eps)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    x64, r64, w64 = _fp64(x, r, w)
    y64, s64 = reference.add_rms_norm(x64, r64, w64, _eps_of(s.dtype, eps))
    terms = [(y, dy, y64), (s, ds, s64)]
    loss = sum((out * g.to(out.dtype)).sum() for (out, g, _), k in zip(terms, ("y", "s")) if k in use)
    loss64 = sum((o64 * g.double()).sum() for (_, g, o64), k in zip(terms, ("y", "s")) if k in use)
    loss.backward()
    loss64.backward()
    return (y, s, *_grads(x, r, w)), (y64, s64, *_grads(x64, r64, w64))


@pytest.mark.parametrize(
    "x_dtype,r_dtype", [(F32, F32), (F16, F16), (F16, F32), (BF16, BF16), (BF16, F32)],
    ids=["f32", "f16", "f16x-f32res", "bf16", "bf16x-f32res"],
)
@pytest.mark.parametrize("weight", ["w", "none"])
def test_add_rms_norm_matches_reference(triton_backend, x_dtype, r_dtype, weight):
    """bf16x-f32res is the modern block: a bf16 branch added to an fp32 residual stream; the
    sum (and its norm, and eps=None's epsilon) are fp32, dx comes back in bf16."""
    out_dtype = torch.promote_types(x_dtype, r_dtype)
    x = torch.randn(2, 37, 100).to(x_dtype)
    r = (torch.randn(2, 37, 100) * 2).to(r_dtype)
    w = torch.randn(100) if weight == "w" else None
    (y, s, dx, dr, dw), (y64, s64, dx64, dr64, dw64) = _run_add(x, r, w)
    assert y.dtype == s.dtype == out_dtype
    assert dx.dtype == x_dtype and dr.dtype == r_dtype
    _close(s, s64, out_dtype)
    _close(y, y64, out_dtype)
    _close(dx, dx64, x_dtype, out_dtype)
    _close(dr, dr64, r_dtype, out_dtype)
    if w is None:
        assert dw is None
    else:
        _close(dw, dw64, out_dtype, scale=74 ** 0.5)


@pytest.mark.parametrize("use", [("y",), ("s",)], ids=["norm-only", "sum-only"])
def test_add_rms_norm_one_output_used(triton_backend, use):
    x, r = torch.randn(3, 1, 300), torch.randn(3, 1, 300)
    got, want = _run_add(x, r, torch.randn(300), eps=1e-6, use=use)
    for g, e in zip(got, want):
        # with only s used, the reference graph never reaches w (grad None); ours: zeros
        _close(g, torch.zeros_like(g) if e is None else e, F32, scale=3)


@pytest.mark.parametrize("forward", [True, False], ids=["both-looped", "backward-looped"])
def test_add_rms_norm_looped_variant(triton_backend, monkeypatch, forward):
    _force_looped(monkeypatch, forward)
    x, r = torch.randn(4, 700).bfloat16(), torch.randn(4, 700)
    got, want = _run_add(x, r, torch.randn(700))
    for g, e, d in zip(got, want, (F32, F32, BF16, F32, F32)):
        _close(g, e, d, scale=2)


def test_single_row_width_one_and_empty(triton_backend):
    # C = 1: y = x / sqrt(x^2 + eps) = +-1 (almost), dx = g * eps / (x^2 + eps)^1.5
    (y, dx, dw), (y64, dx64, dw64) = _run_rms_norm(torch.randn(7, 1), torch.randn(1), eps=1e-3)
    for got, want in ((y, y64), (dx, dx64), (dw, dw64)):
        _close(got, want, F32)
    x = torch.randn(0, 8, requires_grad=True)
    w = _leaf(torch.randn(8))
    y, s = gptfast.add_rms_norm(x, x, w)
    (y.sum() + s.sum()).backward()
    assert y.shape == s.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))


def test_strided_inputs_and_expanded_grad(triton_backend):
    """A transposed x (non-unit stride on C) and the stride-0 dy that .sum() produces."""
    base, w = _leaf(torch.randn(96, 23)), _leaf(torch.randn(96))
    y = gptfast.rms_norm(base.t(), w)  # (23, 96), strides (1, 23)
    y.sum().backward()
    base64, w64 = _fp64(base, w)
    y64 = reference.rms_norm(base64.t(), w64, torch.finfo(F32).eps)
    y64.sum().backward()
    _close(y, y64, F32)
    _close(base.grad, base64.grad, F32)
    _close(w.grad, w64.grad, F32, scale=5)


def test_frozen_weight_gets_no_grad(triton_backend):
    x, w = _leaf(torch.randn(7, 50)), torch.randn(50)  # w: requires_grad=False
    gptfast.rms_norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


def test_backward_is_deterministic(triton_backend):
    x, r, w, dy = torch.randn(37, 200), torch.randn(37, 200), torch.randn(200), torch.randn(37, 200)
    runs = []
    for _ in range(2):
        xs, rs, ws = _leaf(x), _leaf(r), _leaf(w)
        y, s = gptfast.add_rms_norm(xs, rs, ws)
        torch.autograd.backward((y, s), (dy, dy))
        runs.append((xs.grad, rs.grad, ws.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_double_backward_matches_reference(triton_backend, op):
    """A gradient penalty through the norm (create_graph): second derivatives are exact, as
    for layer_norm (the backward formulas in differentiable torch ops)."""
    torch.manual_seed(1)
    x, r, w, c = torch.randn(5, 12), torch.randn(5, 12), torch.randn(12), torch.randn(5, 12)
    results = []
    for backend, dtype in (("triton", F32), ("reference", torch.float64)):
        xs, rs, ws = (t.to(dtype).clone().requires_grad_() for t in (x, r, w))
        with gptfast.use_backend(backend):
            if op == "rms_norm":
                y, extra = gptfast.rms_norm(xs, ws, 1e-5), xs
            else:
                y, extra = gptfast.add_rms_norm(xs, rs, ws, 1e-5)
        loss = (y * c.to(dtype)).sum() + extra.square().sum()
        grads = torch.autograd.grad(loss, (xs, ws), create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        penalty.backward()
        results.append((penalty, xs.grad, ws.grad, rs.grad))
    for got, want in zip(*results):
        if got is None or want is None:  # a zero gradient may come back as None
            assert not any(t is not None and t.any() for t in (got, want))
        else:
            _close(got, want, F32, scale=10)


def test_inf_nan_overflow_and_zero_rows_are_the_references(triton_backend):
    """Per row, as F.rms_norm computing in fp32 (the reference backend): an inf entry gives
    NaN there and 0 elsewhere, a NaN gives a NaN row; a finite row whose sum of squares
    overflows fp32 has rstd = 0, so y = 0 and dx = 0; a row of zeros takes the eps path
    (y = 0, dx = dy * w / sqrt(eps))."""
    x = torch.randn(5, 8)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    x[2] = torch.randn(8) * 1e30
    x[3] = 0.0
    w, dy = torch.randn(8), torch.randn(5, 8)
    outs = []
    for backend in ("triton", "reference"):
        xs, ws = _leaf(x), _leaf(w)
        with gptfast.use_backend(backend):
            y = gptfast.rms_norm(xs, ws, 1e-6)
        y.backward(dy)
        outs.append((y, xs.grad, ws.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(y[0, 3]) and (y[0, :3] == 0).all() and torch.isnan(y[1]).all()
    assert (y[2] == 0).all() and (dx[2] == 0).all() and (y[3] == 0).all()
    torch.testing.assert_close(dx[3], dy[3] * w / 1e-3)
    assert torch.isnan(dx[:2]).all()  # torch: so is the reference


# ------------------------------------------------------------- magnitude edges --
# As tests/test_layernorm_magnitudes.py: each output within FACTOR x the reference backend's
# own error in that dtype (both against fp64 on the same rounded inputs), plus a few roundings
# of the output dtype. RMSNorm has no cancellation; its edges are the scale of the row: huge
# (squares near fp32's top, still finite summed over C; fp16 near its maximum, the sum of
# two such rows included), tiny (squares below fp32's normal
# range or far below eps: the eps path), zeros, a spike among tiny values, unit.
FACTOR = 4.0
SLACK = {F32: 8 * 2.0**-24, F16: 4 * 2.0**-11, BF16: 4 * 2.0**-8}
EDGE_SCALES = {F32: [1e15, 1e-20, 0.0, 1.0], F16: [6e4 / 8, 1e-4, 0.0, 1.0],
               BF16: [1e17, 1e-30, 0.0, 1.0]}
EDGE_C = 700  # not a power of two; above the forced loop thresholds


def _edge_rows(dtype):
    rows = [scale * torch.randn(EDGE_C, dtype=torch.float64) for scale in EDGE_SCALES[dtype]]
    spike = 1e-3 * torch.randn(EDGE_C, dtype=torch.float64)
    spike[EDGE_C // 3] = 300.0
    return torch.stack(rows + [spike]).to(dtype)


def _force(monkeypatch, family):
    if family == "looped":
        _force_looped(monkeypatch)
    elif family == "looped_backward":
        _force_looped(monkeypatch, forward=False)


def _run_backend(backend, op, inputs, upstream):
    """[y, (s), dx, (dr), dw] of ``op`` on ``backend`` (eps=None: torch's default)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with gptfast.use_backend(backend):
        outs = [gptfast.rms_norm(*leaves)] if op == "rms_norm" else list(gptfast.add_rms_norm(*leaves))
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    return outs + list(torch.autograd.grad(total, leaves))


def _exact(op, inputs, upstream):
    """fp64 oracle on what both backends normalise: the sum rounded once to its dtype, and
    eps torch's default for that dtype (not fp64's)."""
    if op == "rms_norm":
        x, w = inputs
        s = x.double().requires_grad_()
    else:
        x, r, w = inputs
        stored = (x.double() + r.double()).to(torch.promote_types(x.dtype, r.dtype))
        s = stored.double().requires_grad_()
    eps = reference.default_rms_eps(x.dtype if op == "rms_norm" else stored.dtype)
    w64 = w.double().requires_grad_()
    y = reference.rms_norm(s, w64, eps)
    total = (y * upstream[0]).sum() + (0 if op == "rms_norm" else (s * upstream[1]).sum())
    ds, dw = torch.autograd.grad(total, (s, w64))
    return [y, ds, dw] if op == "rms_norm" else [y, s, ds, ds, dw]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d)[6:]) for d in (F32, F16, BF16)])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "add_rms_norm_fp32_stream"])
@pytest.mark.parametrize("family", ["fused", "looped", "looped_backward"])
def test_rms_norm_at_the_edges(monkeypatch, dtype, op, family):
    if op == "add_rms_norm_fp32_stream" and dtype == F32:
        pytest.skip("the fp32 stream is the plain add_rms_norm case in fp32")
    _force(monkeypatch, family)
    rows = _edge_rows(dtype)
    weight = torch.randn(EDGE_C).to(dtype)
    if op == "rms_norm":
        inputs, names = [rows, weight], ["y", "dx", "dweight"]
    else:  # x and residual both at the row's scale (the sum of two zero rows stays zero)
        residual = _edge_rows(dtype)
        residual = residual.float() if op == "add_rms_norm_fp32_stream" else residual
        inputs, names = [rows, residual, weight], ["y", "s", "dx", "dresidual", "dweight"]
        op = "add_rms_norm"
    n_outputs = 1 if op == "rms_norm" else 2
    upstream = [torch.randn(rows.shape, dtype=torch.float64) for _ in range(n_outputs)]
    exact = _exact(op, inputs, upstream)
    ref = _run_backend("reference", op, inputs, upstream)
    got = _run_backend("triton", op, inputs, upstream)
    for name, g, r, e in zip(names, got, ref, exact):
        assert g.dtype == r.dtype and g.shape == e.shape, name
        assert torch.isfinite(g).all(), name
        testing.assert_within_reference_error(name, g, r, e, SLACK[g.dtype], FACTOR)


# ------------------------------------------------------------ dispatch, errors --

def test_bad_input_names_the_argument(triton_backend):
    x = torch.randn(4, 8)
    cases = [
        (TypeError, "x", lambda: gptfast.rms_norm(torch.ones(4, 8, dtype=torch.int64))),
        (TypeError, "x", lambda: gptfast.rms_norm([1.0, 2.0])),
        (ValueError, "x", lambda: gptfast.rms_norm(torch.randn(4, 0))),
        (ValueError, "x", lambda: gptfast.rms_norm(torch.tensor(1.0))),
        (ValueError, "weight", lambda: gptfast.rms_norm(x, torch.randn(7))),
        (TypeError, "weight", lambda: gptfast.rms_norm(x, torch.ones(8, dtype=torch.int32))),
        (ValueError, "eps", lambda: gptfast.rms_norm(x, eps=0.0)),
        (ValueError, "eps", lambda: gptfast.rms_norm(x, eps=float("nan"))),
        (TypeError, "eps", lambda: gptfast.rms_norm(x, eps="1e-5")),
        (ValueError, "residual", lambda: gptfast.add_rms_norm(x, torch.randn(4, 9))),
        (TypeError, "residual", lambda: gptfast.add_rms_norm(x, torch.ones(4, 8, dtype=torch.int64))),
        (ValueError, "weight", lambda: gptfast.add_rms_norm(x, x, torch.randn(8, 1))),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()


def test_unsupported_reasons():
    x = torch.randn(4, 8)
    assert ln.rms_norm_unsupported(x) is None
    assert ln.rms_norm_unsupported(x.half(), torch.randn(8)) is None
    assert "float64" in ln.rms_norm_unsupported(x.double())
    assert "weight" in ln.rms_norm_unsupported(x, torch.randn(8).double())
    assert ln.add_rms_norm_unsupported(x.bfloat16(), x) is None
    assert "residual" in ln.add_rms_norm_unsupported(x, x.double())


def test_forced_triton_on_fp64_raises(triton_backend):
    with pytest.raises(gptfast.BackendUnavailable, match="float64"):
        gptfast.rms_norm(torch.randn(4, 8, dtype=torch.float64))


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with gptfast.use_backend("triton"):
        with pytest.raises(gptfast.BackendUnavailable):
            gptfast.rms_norm(torch.randn(4, 8))
        with pytest.raises(gptfast.BackendUnavailable):
            gptfast.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8))


def test_auto_on_cpu_uses_reference_and_triton_runs_the_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    for op in ("rms_norm", "add_rms_norm"):
        monkeypatch.setattr(gptfast.backend.registered_kernel(op), "_function", boom)
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(gptfast.rms_norm(x), F.rms_norm(x, (8,)))
    y, s = gptfast.add_rms_norm(x, r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (8,)))
    for call in (lambda: gptfast.rms_norm(x), lambda: gptfast.add_rms_norm(x, r)):
        with gptfast.use_backend("triton"), pytest.raises(AssertionError, match="Triton kernel ran"):
            call()


def test_custom_ops_match_eager_path_bitwise(triton_backend):
    """The custom ops (traced by torch.compile) and the eager autograd.Functions agree."""
    x, r, w = torch.randn(9, 130).half(), torch.randn(9, 130), torch.randn(130)
    dy, ds = torch.randn(9, 130), torch.randn(9, 130)
    eps = torch.finfo(F32).eps
    results = []
    for through_op in (False, True):
        xs, rs, ws = (_leaf(t) for t in (x, r, w))
        if through_op:
            y, s, _ = torch.ops.gptfast.add_rms_norm_fwd(xs, rs, ws, eps)
            z = torch.ops.gptfast.rms_norm_fwd(y, None, eps)[0]
        else:
            y, s = ln.add_rms_norm(xs, rs, ws)
            z = ln.rms_norm(y)
        torch.autograd.backward((z, s), (dy, ds))
        results.append((z, s, xs.grad, rs.grad, ws.grad))
    for eager, op in zip(*results):
        assert eager.dtype == op.dtype and torch.equal(eager, op)


def _block(x, r, w, norm, add_norm):
    h = norm(x, None)  # nanochat's norm: no weight, eps=None
    y, s = add_norm(h, r, w, 1e-5)
    return (y * s).sum() + h.square().sum()


def _compiled_matches_fp64(norm, add_norm):
    x, r, w = torch.randn(6, 96), torch.randn(6, 96), torch.randn(96)
    fn = torch.compile(lambda *a: _block(*a, norm, add_norm), fullgraph=True, backend="aot_eager")
    leaves = [_leaf(t) for t in (x, r, w)]
    fn(*leaves).backward()
    leaves64 = _fp64(x, r, w)
    _block(*leaves64, lambda t, w: reference.rms_norm(t, w, torch.finfo(F32).eps),
           reference.add_rms_norm).backward()
    for got, want in zip(leaves, leaves64):
        _close(got.grad, want.grad, F32, scale=10)


def test_custom_ops_compile_fullgraph(triton_backend):
    """The fake impls and autograd trace with no graph break (fullgraph raises on one)."""
    torch._dynamo.reset()
    _compiled_matches_fp64(ln.rms_norm, ln.add_rms_norm)


def test_public_api_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    _compiled_matches_fp64(gptfast.rms_norm, gptfast.add_rms_norm)


# ------------------------------------------------------------------------------ GPU --
compiled_only = pytest.mark.skipif(
    gptfast.backend.interpreter_enabled(),
    reason="TRITON_INTERPRET=1 would interpret the kernels: run `pytest -m gpu` on a CUDA machine",
)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("shape", [(65536, 768), (8192, 8192), (4, 1000, 1537), (256, 40000)],
                         ids=["65536x768", "8192x8192", "4x1000x1537", "256x40000-looped"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (BF16, F32), (BF16, None)],
                         ids=["f32", "bf16x-f32w", "bf16-noweight"])
def test_gpu_rms_norm(triton_backend, shape, x_dtype, w_dtype):
    x = (torch.randn(shape, device="cuda") * 2 + 1).to(x_dtype)
    w = None if w_dtype is None else torch.randn(shape[-1], device="cuda").to(w_dtype)
    (y, dx, dw), (y64, dx64, dw64) = _run_rms_norm(x, w)
    _close(y, y64, x_dtype)
    _close(dx, dx64, x_dtype)
    if w is not None:
        _close(dw, dw64, x_dtype, w_dtype, scale=(x.numel() // shape[-1]) ** 0.5)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("x_dtype,r_dtype", [(BF16, BF16), (BF16, F32), (F32, F32)],
                         ids=["bf16", "bf16x-f32res", "f32"])
def test_gpu_add_rms_norm(triton_backend, x_dtype, r_dtype):
    out_dtype = torch.promote_types(x_dtype, r_dtype)
    x = torch.randn(16384, 768, device="cuda").to(x_dtype)
    r = torch.randn(16384, 768, device="cuda").to(r_dtype)
    (y, s, dx, dr, dw), (y64, s64, dx64, dr64, dw64) = _run_add(x, r, torch.randn(768, device="cuda"))
    _close(s, s64, out_dtype)
    _close(y, y64, out_dtype)
    _close(dx, dx64, x_dtype, out_dtype)
    _close(dr, dr64, r_dtype, out_dtype)
    _close(dw, dw64, out_dtype, scale=128)
