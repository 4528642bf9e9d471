"""Bidirectional attention (``causal=False``) with (left, right) windows, on the kernels.

Key j is visible to query i when ``i - window_left <= j <= i + window_right`` (-1 unlimited on
that side) and, with ``document_ids``, both lie in one document; Tq == Tk. The kernels run in
Triton's interpreter (conftest) in fp32, fp16 and bf16 against ``gptfast.reference.attention``
in fp64, forward and backward (dQ, dK, dV), under the "as good as the reference backend" rule
of tests/test_attention_magnitudes.py: the kernel's max error at most 4x that of the reference
run in the test's dtype, plus a few roundings. Its config families (pointer, tma, persistent,
atomic-dq, wide-tiles) and score magnitudes (constant, shifted, wide) are reused here.

Interpreter tiles: forward and dQ 32 query rows x 16 keys, dK/dV 32 keys x 16 query rows, so
bands of a few keys start and end inside tiles, and T of 33..77 leaves partial tiles.
"""

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import gptfast
from gptfast import reference

attention = pytest.importorskip("gptfast.kernels.attention")

from test_attention_magnitudes import (  # noqa: E402
    DTYPES, EDGES, FAMILIES, HEAD_DIM, LSE_ULPS, Family, _scores_inputs,
    assert_as_good_as_reference, ids_from_starts)

# The backward computes P = exp2(score - lse2) before masking it: a masked key far above the
# row's visible scores overflows to inf there (tl.where then picks 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


def random_ids(batch, seq, mean_length, seed):
    begins = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < 1 / mean_length
    return torch.cumsum(begins.long(), dim=1) + 5  # any offset: only equality matters


def make_ids(batch, seq, starts):
    if starts is None:
        return None
    if starts == "random":
        return random_ids(batch, seq, 12, seq)
    return ids_from_starts(batch, seq, starts)


def run_kernels(q, k, v, grad_out, document_ids, windows, scale, grad_lse=None):
    """[O, dQ, dK, dV] and lse2 from the launchers, with the windows mapped as ``attention``
    maps them (kernel_windows); ``grad_lse``: a gradient of the natural-log lse too."""
    window, right = attention.kernel_windows(q.shape[2], False, *windows)
    o, lse2 = attention.attention_forward(q, k, v, scale, document_ids, window, right)
    dlse2 = None if grad_lse is None else grad_lse.float() * math.log(2)
    grads = attention.attention_backward(grad_out, q, k, v, o, lse2, scale,
                                         attention.atomic_dq_enabled(), document_ids, window,
                                         right, dlse2)
    return [o, *grads], lse2


def run_reference(q, k, v, grad_out, document_ids, windows, scale, grad_lse=None):
    """[O, dQ, dK, dV] of ``reference.attention`` (causal=False) in the inputs' dtype, and its
    natural-log logsumexp."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*leaves, scale, False, *windows, document_ids, None, True)
    if grad_lse is None:
        out.backward(grad_out.to(out.dtype))
    else:
        torch.autograd.backward((out, lse), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return [out.detach()] + [t.grad for t in leaves], lse.detach()


def check_against_fp64(q, k, v, grad_out, ids, windows, scale, grad_lse=None):
    dtype = q.dtype
    got, lse2 = run_kernels(q, k, v, grad_out, ids, windows, scale, grad_lse)
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert t.dtype == dtype and t.shape == (q if name in ("out", "dq") else k).shape, name
        assert torch.isfinite(t).all(), name
    want, want_lse = run_reference(q.double(), k.double(), v.double(), grad_out.double(), ids,
                                   windows, scale, grad_lse)
    ref, _ = run_reference(q, k, v, grad_out, ids, windows, scale, grad_lse)
    assert_as_good_as_reference(got, want, ref, dtype)
    want_lse2 = want_lse / math.log(2)
    bound = LSE_ULPS * torch.finfo(torch.float32).eps * max(want_lse2.abs().max().item(), 1.0)
    error = (lse2.double() - want_lse2).abs().max().item()
    assert error <= bound, f"lse2: max error {error:.3g}, bound {bound:.3g}"


# name -> (batch, heads, kv_heads, seq, head_dim, document starts / "random" / None,
#          (window_left, window_right))
CASES = {
    "full-GQA": (1, 4, 2, 45, 16, None, (-1, -1)),
    "self-only-MQA-D24": (1, 2, 1, 45, 24, None, (0, 0)),
    "3-1-B2": (2, 2, 2, 50, 16, None, (3, 1)),
    "1-5-D20": (1, 2, 1, 37, 20, None, (1, 5)),
    "right-2-T64": (1, 2, 1, 64, 16, None, (-1, 2)),
    "left-4": (1, 2, 2, 45, 16, None, (4, -1)),
    "wide-band-20-17": (1, 2, 1, 77, 16, None, (20, 17)),
    "both-beyond-T": (1, 2, 1, 33, 16, None, (33, 100)),
    "left-beyond-T": (1, 2, 1, 45, 16, None, (44, 3)),
    "right-beyond-T": (1, 2, 1, 45, 16, None, (2, 44)),
    "T1": (1, 2, 1, 1, 16, None, (-1, -1)),
    "T1-self-only-D8": (1, 2, 2, 1, 8, None, (0, 0)),
    "T2-0-1": (1, 1, 1, 2, 16, None, (0, 1)),
    "docs-full": (2, 2, 1, 77, 16, "random", (-1, -1)),
    "docs-3-1": (1, 2, 2, 70, 16, [3, 4, 5, 20, 33, 47, 48, 69], (3, 1)),
    "docs-1-5-GQA-D24": (1, 4, 2, 70, 24, [5, 33, 47, 48, 69], (1, 5)),
    "docs-right-2": (1, 2, 1, 64, 16, [16, 32, 40], (-1, 2)),
    "docs-left-4": (1, 2, 1, 45, 16, [7, 30], (4, -1)),
    "docs-self-only": (1, 2, 1, 40, 16, [3, 4, 20], (0, 0)),
    "one-token-documents": (1, 2, 2, 33, 16, list(range(33)), (-1, -1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_windows_and_documents_match_fp64(dtype, case):
    batch, heads, kv_heads, seq, head_dim, starts, windows = case
    generator = torch.Generator().manual_seed(seq + head_dim)
    q_shape, kv_shape = (batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
                         for shape in (q_shape, kv_shape, kv_shape, q_shape))
    check_against_fp64(q, k, v, grad_out, make_ids(batch, seq, starts), windows, head_dim ** -0.5)


# Score magnitudes at the edges of each dtype (tests/test_attention_magnitudes.py), in every
# config family, with a gradient on the lse as well as on the output.
# name -> (batch, heads, kv_heads, seq, document starts, windows, input kind)
MAGNITUDE_CASES = {
    "full-wide-GQA": (1, 2, 1, 50, None, (-1, -1), "wide"),
    # every row sees one key, every score at the low edge: o == v
    "self-only-constant-low": (1, 2, 2, 48, None, (0, 0), "constant_low"),
    "docs-3-1-shifted-GQA": (1, 2, 1, 70, [3, 4, 5, 20, 33, 47, 48, 69], (3, 1), "shifted"),
    "docs-1-5-wide": (1, 2, 1, 77, [9, 30, 31, 58], (1, 5), "wide"),
    # rows 40.. of tile [32, 64) see nothing in key block [16, 32): the left edge starts
    # with a block they cannot see; and every key they do see is at the low edge
    "docs-right-20-constant-low": (1, 1, 1, 64, [17, 40], (-1, 20), "constant_low"),
    "window-5-2-constant-high": (1, 1, 1, 45, None, (5, 2), "constant_high"),
}


@pytest.fixture(params=FAMILIES)
def family(request, monkeypatch):
    return Family(request.param, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAGNITUDE_CASES.values(), ids=MAGNITUDE_CASES.keys())
def test_every_config_family_at_dtype_edges(family, dtype, case):
    batch, heads, kv_heads, seq, starts, windows, kind = case
    generator = torch.Generator().manual_seed(seq)
    q, k = _scores_inputs(kind.split("_")[0], EDGES[dtype][kind], batch, heads, kv_heads, seq,
                          generator)
    v = torch.randn(batch, kv_heads, seq, HEAD_DIM, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, heads, seq, HEAD_DIM, generator=generator, dtype=torch.float64)
    # the lse's gradient too (its fp32 rows): dS gains P * dlse, taken off each row's delta
    grad_lse = torch.randn(batch, heads, seq, generator=generator, dtype=torch.float64)
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    check_against_fp64(q, k, v, grad_out, make_ids(batch, seq, starts), windows,
                       HEAD_DIM ** -0.5, grad_lse)
    family.check_it_ran()


# ------------------------------------------------------------------- skipped blocks --

def nan_outside(seq, inside, *tensors):
    """The tensors (B, H, T, D) with NaN in every row outside ``inside`` (a slice)."""
    out = []
    for t in tensors:
        t = t.clone()
        outside = torch.ones(seq, dtype=torch.bool)
        outside[inside] = False
        t[:, :, outside] = float("nan")
        out.append(t)
    return out


# mask -> (T, document starts, windows, rows left finite, rows checked)
ISOLATION = {
    # documents [0, 32), [32, 64), [64, 96): the middle one sees nothing of the others
    "documents": (96, [32, 64], (-1, -1), slice(32, 64), slice(32, 64)),
    "documents-window": (96, [32, 64], (3, 2), slice(32, 64), slice(32, 64)),
    # no documents, window (3, 2), NaN in rows < 13 and >= 179. Loading is per tile, so NaN
    # reaches more than the rows that see it: the forward tiles [0, 32) and [160, 192) load
    # the NaN value rows for their rows 13..18 and 174..178 (masked P 0 times NaN V), so all
    # their outputs, hence the deltas of rows [0, 32) and [160, 192), are NaN. The rows
    # [64, 128) and their bands stay clear of both: their query tiles load keys [48, 144),
    # their key tiles queries [48, 144), and the other key tiles adding into their dQ
    # (atomic) read only their own clean rows.
    "window": (192, None, (3, 2), slice(13, 179), slice(64, 128)),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["deterministic-dq", "atomic-dq"])
@pytest.mark.parametrize("mask", ISOLATION.values(), ids=ISOLATION.keys())
def test_blocks_outside_the_band_are_never_read(atomic_dq, mask, monkeypatch):
    """NaN in q, k, v and dO at positions rows in the middle must not see, before and after
    them: a kernel that loads a block outside the visible band (even only to mask it) spreads
    the NaN through its matmuls. The middle rows must come out finite and right."""
    monkeypatch.setattr(attention, "_ATOMIC_DQ", atomic_dq)
    seq, starts, windows, finite, middle = mask
    generator = torch.Generator().manual_seed(7)
    q, k, v, grad_out = (torch.randn(1, 2, seq, 16, generator=generator) for _ in range(4))
    k, v = k[:, :1].clone(), v[:, :1].clone()
    ids = make_ids(1, seq, starts)
    got, _ = run_kernels(*nan_outside(seq, finite, q, k, v, grad_out), ids, windows, 0.25)
    want, _ = run_reference(*(t.double() for t in (q, k, v, grad_out)), ids, windows, 0.25)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g[:, :, middle]).all(), name
        torch.testing.assert_close(g[:, :, middle].double(), w[:, :, middle], atol=1e-5,
                                   rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------ the public op --

def make_qkv(batch, heads, kv_heads, seq, head_dim, dtype=torch.float32):
    return tuple(torch.randn(shape, dtype=dtype).requires_grad_()
                 for shape in ((batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim),
                               (batch, kv_heads, seq, head_dim)))


def fp64_reference(q, k, v, grad_out, grad_lse, **masks):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*leaves, causal=False, return_lse=True, **masks)
    torch.autograd.backward((out, lse), (grad_out.double(), grad_lse.double()))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("masks", [
    dict(), dict(window_left=3, window_right=1), dict(window_left=-1, window_right=4),
    dict(window_left=2, window_right=6, document_ids=ids_from_starts(2, 37, [6, 20, 21])),
], ids=["full", "3-1", "right-4", "docs-2-6"])
def test_public_attention_runs_the_kernels_with_lse(triton_backend, masks):
    """Output and lse, and the gradients through both (the lse is differentiable, as the
    reference's is)."""
    q, k, v = make_qkv(2, 4, 2, 37, 24)
    grad_out, grad_lse = torch.randn(q.shape), torch.randn(q.shape[:3])
    out, lse = gptfast.functional.attention(q, k, v, causal=False, return_lse=True, **masks)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 37)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    want_out, want_lse, want_grads = fp64_reference(q, k, v, grad_out, grad_lse, **masks)
    torch.testing.assert_close(out.detach().double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.detach().double(), want_lse, atol=1e-5, rtol=1e-6)
    for name, t, want in zip(("dq", "dk", "dv"), (q, k, v), want_grads):
        torch.testing.assert_close(t.grad.double(), want, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_of_the_lse_alone(triton_backend):
    """A loss on the lse only (no gradient reaches the output): dV is 0, dQ and dK are the
    lse's."""
    q, k, v = make_qkv(1, 2, 1, 21, 16)
    _, lse = gptfast.functional.attention(q, k, v, causal=False, window_left=4, window_right=2,
                                          return_lse=True)
    lse.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, want = reference.attention(*leaves, causal=False, window_left=4, window_right=2,
                                  return_lse=True)
    want.square().sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v.grad))
    for t, w in zip((q, k), leaves):
        torch.testing.assert_close(t.grad.double(), w.grad, atol=1e-4, rtol=1e-4)


def test_causal_lse_and_no_grad_call(triton_backend):
    """return_lse on the causal kernels too, and the forward alone outside autograd."""
    q, k, v = make_qkv(1, 2, 1, 40, 16)
    out, lse = gptfast.functional.attention(q, k, v, causal=True, window_left=5, return_lse=True)
    with torch.no_grad():
        plain = gptfast.functional.attention(q, k, v, causal=False, window_left=5, window_right=3)
    leaves = [t.detach().double() for t in (q, k, v)]
    want, want_lse = reference.attention(*leaves, causal=True, window_left=5, return_lse=True)
    torch.testing.assert_close(out.detach().double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(plain.double(), reference.attention(
        *leaves, causal=False, window_left=5, window_right=3), atol=1e-5, rtol=1e-5)


def run_public(q, k, v, grad_out, **kwargs):
    for t in (q, k, v):
        t.grad = None
    out = gptfast.functional.attention(q, k, v, **kwargs)
    out.backward(grad_out)
    return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]


def test_right_window_0_and_windows_past_the_sequence_take_the_same_kernels(triton_backend):
    """causal=False with window_right 0 is the causal mask: the causal kernels, bit for bit;
    windows reaching past the sequence are unlimited ones, bit for bit."""
    q, k, v = make_qkv(1, 2, 1, 45, 16)
    ids = ids_from_starts(1, 45, [9, 30])
    grad_out = torch.randn(q.shape)
    pairs = [
        (dict(causal=False, window_right=0, window_left=4, document_ids=ids),
         dict(causal=True, window_left=4, document_ids=ids)),
        (dict(causal=False, window_left=44, window_right=200), dict(causal=False)),
        (dict(causal=False, window_left=3, window_right=44), dict(causal=False, window_left=3)),
        (dict(causal=True, window_left=44, window_right=7), dict(causal=True)),
    ]
    for kwargs, same in pairs:
        for got, want in zip(run_public(q, k, v, grad_out, **kwargs),
                             run_public(q, k, v, grad_out, **same)):
            assert torch.equal(got, want), kwargs
    causal = run_public(q, k, v, grad_out, causal=True, window_left=4, document_ids=ids)
    old = gptfast.causal_attention(q, k, v, window=5, document_ids=ids)
    assert torch.equal(causal[0], old.detach())


def test_causal_launches_pass_no_bidirectional_argument():
    """The causal kernels are compiled exactly as before: no new constexpr is passed."""
    ids = torch.zeros(1, 8, dtype=torch.long)
    for window, bound in ((None, 0), (5, 0), (5, 1)):
        for document_ids in (None, ids):
            args = attention._mask_args(document_ids, window, bound)
            assert not {"BIDIRECTIONAL", "SLIDING_RIGHT", "window_right"} & set(args)
    assert attention._mask_args(None, None, 0) == {}
    args = attention._mask_args(ids, None, 0, window_right=None)
    assert args["BIDIRECTIONAL"] and not args["SLIDING_RIGHT"] and "DOC_END" in args


def test_kernel_windows_map_flash_attentions_windows():
    assert attention.kernel_windows(10, True, -1, 5) == (None, 0)
    assert attention.kernel_windows(10, True, 3, -1) == (4, 0)
    assert attention.kernel_windows(10, False, 3, 0) == (4, 0)
    assert attention.kernel_windows(10, False, -1, -1) == (None, None)
    assert attention.kernel_windows(10, False, 0, 0) == (1, 0)
    assert attention.kernel_windows(10, False, 8, 8) == (9, 8)
    assert attention.kernel_windows(10, False, 9, 9) == (None, None)


def test_unsupported_accepts_bidirectional_and_lse():
    q = torch.empty(1, 2, 6, 16)
    unsupported = attention.attention_unsupported
    for causal, left, right in ((False, -1, -1), (False, 2, 3), (False, 0, 0), (True, 1, -1)):
        assert unsupported(q, q, q, None, causal, left, right, return_lse=True) is None
    assert "Tq=6, Tk=4" in unsupported(q, q[:, :, :4], q[:, :, :4], None, False)
    assert "key_lengths" in unsupported(q, q, q, None, False, key_lengths=torch.tensor([6]))


def test_custom_ops_pass_opcheck():
    q, k, v = make_qkv(1, 2, 1, 8, 16)
    ids = ids_from_starts(1, 8, [3])
    forward = torch.ops.gptfast.attention_forward.default
    backward = torch.ops.gptfast.attention_backward.default
    for masks in ((False, 2, 1, ids), (False, -1, -1, None), (True, 3, -1, None)):
        torch.library.opcheck(forward, (q, k, v, 0.25, *masks))
        out, lse2 = forward(q, k, v, 0.25, *masks)
        saved = (q.detach(), k.detach(), v.detach(), out.detach(), lse2.detach())
        torch.library.opcheck(backward, (torch.randn_like(out), *saved, 0.25, False, *masks))
        torch.library.opcheck(backward, (torch.randn_like(out), *saved, 0.25, False, *masks,
                                         torch.randn_like(lse2)))


def test_double_backward_raises(triton_backend):
    q, k, v = make_qkv(1, 2, 1, 6, 8)
    out = gptfast.functional.attention(q, k, v, causal=False, window_left=1, window_right=2)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        sum(g.square().sum() for g in grads).backward()


# ------------------------------------------------------------------------ torch.compile --

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile_fullgraph(triton_backend, fresh_dynamo):
    q, k, v = make_qkv(1, 2, 1, 24, 16)
    ids = ids_from_starts(1, 24, [5, 17])

    def loss_of(q, k, v, ids):
        out, lse = gptfast.functional.attention(q, k, v, causal=False, window_left=3,
                                                window_right=2, document_ids=ids,
                                                return_lse=True)
        return out.square().sum() + lse.sum()

    explained = torch._dynamo.explain(loss_of)(q, k, v, ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    got = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(q, k, v, ids)
    got_grads = torch.autograd.grad(got, (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*leaves, None, False, 3, 2, ids, None, True)
    want = out.square().sum() + lse.sum()
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-4, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_layers_with_different_windows_share_one_graph(triton_backend, fresh_dynamo):
    """Windows are op arguments: a model whose layers use different windows compiles once."""
    q, k, v = make_qkv(1, 2, 2, 20, 16)
    counter = CompileCounterWithBackend("aot_eager")

    def layers(q, k, v):
        for left, right in ((2, 1), (5, 0), (-1, -1), (3, 7)):
            q = gptfast.functional.attention(q, k, v, causal=False, window_left=left,
                                             window_right=right)
        return q.sum()

    got = torch.compile(layers, fullgraph=True, backend=counter)(q, k, v)
    assert counter.frame_count == 1
    with gptfast.use_backend("reference"):
        torch.testing.assert_close(got, layers(q, k, v), atol=1e-4, rtol=1e-4)


def test_windows_passed_as_arguments_recompile_at_most_once(triton_backend, fresh_dynamo):
    """A window that is an argument of the compiled function: the second value recompiles
    (dynamo then traces it as a symbolic int), no later value does, -1 and past-T ones too."""
    q, k, v = make_qkv(1, 2, 1, 8, 16)
    counter = CompileCounterWithBackend("aot_eager")

    def loss_of(q, k, v, left, right):
        return gptfast.functional.attention(q, k, v, causal=False, window_left=left,
                                            window_right=right).sum()

    compiled = torch.compile(loss_of, fullgraph=True, backend=counter)
    leaves = [t.detach().double() for t in (q, k, v)]
    for left, right in ((2, 1), (3, 2), (4, 5), (-1, 3), (1, -1), (20, 30)):
        got = compiled(q, k, v, left, right)
        want = reference.attention(*leaves, causal=False, window_left=left, window_right=right)
        torch.testing.assert_close(got.double(), want.sum(), atol=1e-4, rtol=1e-5)
    assert counter.frame_count == 2
