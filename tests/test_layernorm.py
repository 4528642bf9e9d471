"""The Triton LayerNorm kernels against gptfast.reference computed in fp64.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so shapes stay small; bf16 and the large shapes run only on a GPU (marked ``gpu``).
"""

import pytest
import torch

import gptfast
from gptfast import reference

triton = pytest.importorskip("triton")
ln = pytest.importorskip("gptfast.kernels.layernorm")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (rtol, atol) by the lowest-precision dtype a result passed through. BF16 is tighter than
# gptfast.testing.bf16_tolerance(TOL[F16]) (8e-2): these kernels compute in fp32 and round once.
TOL = {F32: (1e-5, 1e-5), F16: (1e-2, 1e-2), BF16: (2e-2, 2e-2)}


def _tol(*dtypes):
    return max(TOL[d] for d in dtypes if d is not None)


def _close(actual, expected, *dtypes, scale=1.0):
    rtol, atol = _tol(*dtypes)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def _leaf(t, requires_grad=True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def _params(C, w_dtype, affine, device="cpu"):
    w = torch.randn(C, device=device).to(w_dtype) if affine in ("wb", "w") else None
    b = torch.randn(C, device=device).to(w_dtype) if affine == "wb" else None
    return w, b


def _fp64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _grads(*ts):
    return [None if t is None else t.grad for t in ts]


def _run_layer_norm(x, w, b, eps=1e-5):
    """(y, dx, dw, db) from gptfast.layer_norm, and the same from reference in fp64."""
    x, w, b = _leaf(x), _leaf(w), _leaf(b)
    y = gptfast.layer_norm(x, w, b, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = _fp64(x, w, b)
    y64 = reference.layer_norm(x64, w64, b64, eps)
    y64.backward(dy.double())
    return (y, *_grads(x, w, b)), (y64, *_grads(x64, w64, b64))


SHAPES = [(37, 200), (3, 1, 4097), (1, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_matches_reference(triton_backend, shape, dtype, affine):
    x = torch.randn(shape).to(dtype) * 3 + 1  # an offset mean: the statistics must handle it
    w, b = _params(shape[-1], dtype, affine)
    (y, dx, dw, db), (y64, dx64, dw64, db64) = _run_layer_norm(x, w, b)
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype
    _close(y, y64, dtype)
    _close(dx, dx64, dtype)
    rows = x.numel() // shape[-1]
    for got, want in ((dw, dw64), (db, db64)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype
            _close(got, want, dtype, scale=rows ** 0.5)


@pytest.mark.parametrize("x_dtype,w_dtype", [(F16, F32), (F32, F16), (BF16, F32), (F32, BF16)],
                         ids=["f16x-f32w", "f32x-f16w", "bf16x-f32w", "f32x-bf16w"])
def test_layer_norm_mixed_param_dtype(triton_backend, x_dtype, w_dtype):
    x = torch.randn(19, 160).to(x_dtype)
    w, b = _params(160, w_dtype, "wb")
    (y, dx, dw, db), (y64, dx64, dw64, db64) = _run_layer_norm(x, w, b, eps=1e-6)
    assert y.dtype == x_dtype and dx.dtype == x_dtype
    assert dw.dtype == w_dtype and db.dtype == w_dtype
    _close(y, y64, x_dtype)
    _close(dx, dx64, x_dtype)
    _close(dw, dw64, x_dtype, w_dtype, scale=19 ** 0.5)
    _close(db, db64, x_dtype, w_dtype, scale=19 ** 0.5)


def _force_looped(monkeypatch, forward=True):
    """Rows past MAX_FUSED_C (MAX_FUSED_BWD_C in backward) take the chunked kernels: forced
    small here. ``forward=False`` loops only the backward, as rows of 16384 do on GPU."""
    if forward:
        monkeypatch.setattr(ln, "MAX_FUSED_C", 512)
        monkeypatch.setattr(ln, "LOOP_BLOCK_C", 256)
    monkeypatch.setattr(ln, "MAX_FUSED_BWD_C", 512)
    monkeypatch.setattr(ln, "LOOP_BWD_BLOCK_C", 256)


@pytest.mark.parametrize("forward", [True, False], ids=["both-looped", "backward-looped"])
def test_layer_norm_looped_variant(triton_backend, monkeypatch, forward):
    _force_looped(monkeypatch, forward)
    for dtype in (F32, F16, BF16):
        x = torch.randn(5, 1000).to(dtype) * 2 + 5
        w, b = _params(1000, F32, "wb")
        (y, dx, dw, db), (y64, dx64, dw64, db64) = _run_layer_norm(x, w, b)
        _close(y, y64, dtype)
        _close(dx, dx64, dtype)
        _close(dw, dw64, dtype, scale=3)
        _close(db, db64, dtype, scale=3)


def _run_add(x, r, w, b, eps=1e-5, use=("y", "s")):
    x, r, w, b = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
    y, s = gptfast.add_layer_norm(x, r, w, b, eps)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    x64, r64, w64, b64 = _fp64(x, r, w, b)
    y64, s64 = reference.add_layer_norm(x64, r64, w64, b64, eps)
    terms = [(y, dy, y64), (s, ds, s64)]
    loss = sum((out * g.to(out.dtype)).sum() for (out, g, _), k in zip(terms, ("y", "s")) if k in use)
    loss64 = sum((o64 * g.double()).sum() for (_, g, o64), k in zip(terms, ("y", "s")) if k in use)
    loss.backward()
    loss64.backward()
    return (y, s, *_grads(x, r, w, b)), (y64, s64, *_grads(x64, r64, w64, b64))


@pytest.mark.parametrize(
    "x_dtype,r_dtype", [(F32, F32), (F16, F16), (F16, F32), (F32, F16), (BF16, BF16), (BF16, F32)],
    ids=["f32", "f16", "f16x-f32res", "f32x-f16res", "bf16", "bf16x-f32res"],
)
@pytest.mark.parametrize("affine", ["wb", "none"])
def test_add_layer_norm_matches_reference(triton_backend, x_dtype, r_dtype, affine):
    out_dtype = torch.promote_types(x_dtype, r_dtype)
    x = torch.randn(37, 200).to(x_dtype)
    r = (torch.randn(37, 200) * 2).to(r_dtype)
    w, b = _params(200, F32, affine)
    (y, s, dx, dr, dw, db), (y64, s64, dx64, dr64, dw64, db64) = _run_add(x, r, w, b)
    assert y.dtype == s.dtype == out_dtype
    assert dx.dtype == x_dtype and dr.dtype == r_dtype
    _close(s, s64, out_dtype)
    _close(y, y64, out_dtype)
    _close(dx, dx64, x_dtype, out_dtype)
    _close(dr, dr64, r_dtype, out_dtype)
    if affine == "wb":
        _close(dw, dw64, out_dtype, scale=37 ** 0.5)
        _close(db, db64, out_dtype, scale=37 ** 0.5)
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("use", [("y",), ("s",)], ids=["norm-only", "sum-only"])
def test_add_layer_norm_one_output_used(triton_backend, use):
    x, r = torch.randn(3, 1, 4097), torch.randn(3, 1, 4097)
    w, b = _params(4097, F32, "wb")
    got, want = _run_add(x, r, w, b, use=use)
    for g, e in zip(got, want):
        # with only s used, the reference graph never reaches w, b (grad None); ours: zeros
        _close(g, torch.zeros_like(g) if e is None else e, F32, scale=3)


@pytest.mark.parametrize("forward", [True, False], ids=["both-looped", "backward-looped"])
def test_add_layer_norm_looped_variant(triton_backend, monkeypatch, forward):
    _force_looped(monkeypatch, forward)
    x, r = torch.randn(4, 700).half(), torch.randn(4, 700)
    w, b = _params(700, F32, "wb")
    got, want = _run_add(x, r, w, b)
    for g, e, d in zip(got, want, (F32, F32, F16, F32, F32, F32)):
        _close(g, e, d, F16, scale=2)


def test_single_row_and_empty(triton_backend):
    (y, dx, dw, db), (y64, dx64, dw64, db64) = _run_layer_norm(torch.randn(1, 300), *_params(300, F32, "wb"))
    for got, want in ((y, y64), (dx, dx64), (dw, dw64), (db, db64)):
        _close(got, want, F32)
    x = torch.randn(0, 8, requires_grad=True)
    w, b = _leaf(torch.randn(8)), _leaf(torch.randn(8))
    y = gptfast.layer_norm(x, w, b)
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))


def test_strided_inputs_and_expanded_grad(triton_backend):
    """A transposed x (non-unit stride on C) and the stride-0 dy that .sum() produces."""
    base = _leaf(torch.randn(96, 23))
    w = _leaf(torch.randn(96))
    y = gptfast.layer_norm(base.t(), w, None)  # (23, 96), strides (1, 23)
    y.sum().backward()
    base64, w64 = _fp64(base, w)
    y64 = reference.layer_norm(base64.t(), w64, None)
    y64.sum().backward()
    _close(y, y64, F32)
    _close(base.grad, base64.grad, F32)
    _close(w.grad, w64.grad, F32, scale=5)


def test_frozen_params_get_no_grad(triton_backend):
    x = _leaf(torch.randn(7, 50))
    w, b = torch.randn(50), torch.randn(50)  # requires_grad=False
    gptfast.layer_norm(x, w, b).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


def test_backward_is_deterministic(triton_backend):
    x = torch.randn(37, 200)
    w, b = _params(200, F32, "wb")
    dy = torch.randn(37, 200)
    runs = []
    for _ in range(2):
        xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
        gptfast.layer_norm(xs, ws, bs).backward(dy)
        runs.append((xs.grad, ws.grad, bs.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_double_backward_matches_reference(triton_backend, op):
    """A gradient penalty through the norm, with a constant upstream gradient into it (which
    @once_differentiable would have let through without a graph)."""
    torch.manual_seed(1)
    x, r, w, b, c = (torch.randn(5, 12), torch.randn(5, 12), torch.randn(12), torch.randn(12),
                     torch.randn(5, 12))
    results = []
    for backend, dtype in (("triton", F32), ("reference", torch.float64)):
        xs, rs, ws, bs = (t.to(dtype).clone().requires_grad_() for t in (x, r, w, b))
        with gptfast.use_backend(backend):
            if op == "layer_norm":
                y, extra = gptfast.layer_norm(xs, ws, bs), xs
            else:
                y, extra = gptfast.add_layer_norm(xs, rs, ws, bs)
        loss = (y * c.to(dtype)).sum() + extra.square().sum()
        grads = torch.autograd.grad(loss, (xs, ws), create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        penalty.backward()
        results.append((penalty, xs.grad, ws.grad, bs.grad, rs.grad))
    for got, want in zip(*results):
        if got is None or want is None:  # a zero gradient may come back as None
            assert not any(t is not None and t.any() for t in (got, want))
        else:
            _close(got, want, F32, scale=10)


def test_extreme_magnitudes(triton_backend):
    """Rows with inf/NaN give NaN, as torch; a finite row whose variance overflows fp32 gives
    the bias on triton (xhat = 0), the documented difference from torch's CPU kernel (NaN)."""
    w, b = torch.randn(8), torch.randn(8)
    x = torch.randn(4, 8)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    x[2] = torch.randn(8) * 1e30
    y = gptfast.layer_norm(x, w, b)
    want = torch.nn.functional.layer_norm(x, (8,), w, b)
    assert torch.isnan(y[:2]).all() and torch.isnan(want[:2]).all()
    torch.testing.assert_close(y[2], b)
    assert torch.isnan(want[2]).all()  # if torch changes here, README and functional must too
    _close(y[3], want[3], F32)


def test_unsupported_reasons():
    x = torch.randn(4, 8)
    assert ln.layer_norm_unsupported(x, torch.randn(8), None) is None
    assert "float64" in ln.layer_norm_unsupported(x.double())
    assert "weight" in ln.layer_norm_unsupported(x, torch.randn(8).double())
    assert ln.add_layer_norm_unsupported(x.half(), x, None, None) is None
    assert "residual" in ln.add_layer_norm_unsupported(x, x.double())


def test_forced_triton_on_fp64_raises(triton_backend):
    with pytest.raises(gptfast.BackendUnavailable, match="float64"):
        gptfast.layer_norm(torch.randn(4, 8, dtype=torch.float64))


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with gptfast.use_backend("triton"):
        with pytest.raises(gptfast.BackendUnavailable):
            gptfast.layer_norm(torch.randn(4, 8))
        with pytest.raises(gptfast.BackendUnavailable):
            gptfast.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8))


def test_auto_on_cpu_uses_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    for op in ("layer_norm", "add_layer_norm"):
        kernel = gptfast.backend.registered_kernel(op)
        monkeypatch.setattr(kernel, "_function", boom)  # the loaded entry point
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(gptfast.layer_norm(x), reference.layer_norm(x))
    y, s = gptfast.add_layer_norm(x, r)
    torch.testing.assert_close(y, reference.layer_norm(x + r))
    with gptfast.use_backend("triton"), pytest.raises(AssertionError, match="Triton kernel ran"):
        gptfast.layer_norm(x)  # the patch is the function forcing triton would call


def test_custom_ops_match_eager_path_bitwise(triton_backend):
    """The custom ops (traced by torch.compile) and the eager autograd.Functions agree."""
    x, r = torch.randn(9, 130).half(), torch.randn(9, 130)
    w, b = _params(130, F32, "wb")
    dy, ds = torch.randn(9, 130), torch.randn(9, 130)
    results = []
    for through_op in (False, True):
        xs, rs, ws, bs = (_leaf(t) for t in (x, r, w, b))
        if through_op:
            y, s, _, _ = torch.ops.gptfast.add_layer_norm_fwd(xs, rs, ws, bs, 1e-5)
            z = torch.ops.gptfast.layer_norm_fwd(y, ws, None, 1e-5)[0]
        else:
            y, s = ln.add_layer_norm(xs, rs, ws, bs)
            z = ln.layer_norm(y, ws, None)
        torch.autograd.backward((z, s), (dy, ds))
        results.append((z, s, xs.grad, rs.grad, ws.grad, bs.grad))
    for eager, op in zip(*results):
        assert eager.dtype == op.dtype and torch.equal(eager, op)


def _block(x, r, w, b, ln_fn, add_fn):
    h = ln_fn(x, w, b)
    y, s = add_fn(h, r, w, None)
    return (y * s).sum() + h.square().sum()


def _compiled_matches_eager(ln_fn, add_fn):
    x, r = torch.randn(6, 96), torch.randn(6, 96)
    w, b = torch.randn(96), torch.randn(96)
    fn = torch.compile(lambda *a: _block(*a, ln_fn, add_fn), fullgraph=True, backend="aot_eager")
    leaves = [_leaf(t) for t in (x, r, w, b)]
    fn(*leaves).backward()
    leaves64 = _fp64(x, r, w, b)
    _block(*leaves64, reference.layer_norm, reference.add_layer_norm).backward()
    for got, want in zip(leaves, leaves64):
        _close(got.grad, want.grad, F32, scale=10)


def test_custom_ops_compile_fullgraph(triton_backend):
    """The custom ops' fake impls and autograd trace with no graph break (aot_eager)."""
    torch._dynamo.reset()
    _compiled_matches_eager(ln.layer_norm, ln.add_layer_norm)


def test_public_api_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    _compiled_matches_eager(gptfast.layer_norm, gptfast.add_layer_norm)


# ------------------------------------------------------------------------------ GPU --
# conftest turns the interpreter on by default; the GPU tests are about compiled kernels.
compiled_only = pytest.mark.skipif(
    gptfast.backend.interpreter_enabled(),
    reason="TRITON_INTERPRET=1 would interpret the kernels: run `pytest -m gpu` on a CUDA machine",
)

@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("shape", [(65536, 768), (8192, 8192), (4, 1000, 1537)],
                         ids=["65536x768", "8192x8192", "4x1000x1537"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F16)],
                         ids=["f32", "bf16x-f32w", "bf16", "f16"])
def test_gpu_layer_norm(triton_backend, shape, x_dtype, w_dtype):
    x = (torch.randn(shape, device="cuda") * 2 + 1).to(x_dtype)
    w, b = _params(shape[-1], w_dtype, "wb", device="cuda")
    (y, dx, dw, db), (y64, dx64, dw64, db64) = _run_layer_norm(x, w, b)
    rows = x.numel() // shape[-1]
    _close(y, y64, x_dtype)
    _close(dx, dx64, x_dtype)
    # dw sums `rows` products of rounded values: tolerance grows like sqrt(rows)
    _close(dw, dw64, x_dtype, w_dtype, scale=rows ** 0.5)
    _close(db, db64, x_dtype, w_dtype, scale=rows ** 0.5)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("x_dtype,r_dtype", [(BF16, BF16), (BF16, F32), (F32, F32)],
                         ids=["bf16", "bf16x-f32res", "f32"])
def test_gpu_add_layer_norm(triton_backend, x_dtype, r_dtype):
    out_dtype = torch.promote_types(x_dtype, r_dtype)
    x = torch.randn(16384, 768, device="cuda").to(x_dtype)
    r = torch.randn(16384, 768, device="cuda").to(r_dtype)
    w, b = _params(768, F32, "wb", device="cuda")
    (y, s, dx, dr, dw, db), (y64, s64, dx64, dr64, dw64, db64) = _run_add(x, r, w, b)
    _close(s, s64, out_dtype)
    _close(y, y64, out_dtype)
    _close(dx, dx64, x_dtype, out_dtype)
    _close(dr, dr64, r_dtype, out_dtype)
    _close(dw, dw64, out_dtype, scale=128)
    _close(db, db64, out_dtype, scale=128)


@pytest.mark.gpu
@compiled_only
def test_gpu_looped_and_deterministic(triton_backend):
    x = torch.randn(64, 40000, device="cuda", dtype=BF16)  # > MAX_FUSED_C: looped kernels
    w, b = _params(40000, F32, "wb", device="cuda")
    (y, dx, dw, db), (y64, dx64, dw64, db64) = _run_layer_norm(x, w, b)
    _close(y, y64, BF16)
    _close(dx, dx64, BF16)
    _close(dw, dw64, BF16, scale=8)
    x = torch.randn(20000, 768, device="cuda")
    dy = torch.randn_like(x)
    grads = []
    for _ in range(2):
        xs, ws, bs = _leaf(x), _leaf(w[:768]), _leaf(b[:768])
        gptfast.layer_norm(xs, ws, bs).backward(dy)
        grads.append((xs.grad, ws.grad, bs.grad))
    assert all(torch.equal(a, c) for a, c in zip(*grads))
