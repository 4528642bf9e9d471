"""gptfast.flash_attn_interface against an fp64 oracle written from flash-attention's docstrings.

The oracle (``fa_attention``) takes FA's rules literally, one query row at a time: query i of
Tq sits at position ``i + L - Tq`` (L keys: Tk, or cache_seqlens + new keys), sees key j < L
with ``position - left <= j <= position + right`` (-1 unlimited, causal: right = 0), head h
reads kv head ``h // (H // Hkv)``; a row with no visible key is 0 ("If the row of the mask is
all zero, the output will be zero"). It does not use gptfast.reference. Each case runs on the
"reference" backend and on forced "triton" (the interpreter on CPU); where the kernels do not
take a case yet the triton run skips with the BackendUnavailable reason, so it turns on by
itself when they do.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import gptfast
import gptfast.flash_attn_interface as flash_attn
from gptfast.testing import bf16_tolerance

BACKENDS = ["reference", "triton"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                 ids=["fp32", "fp16", "bf16"])
# (output, gradients) tolerance, used as atol and rtol, by input dtype
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 1e-2)}
TOLERANCE[torch.bfloat16] = bf16_tolerance(TOLERANCE[torch.float16])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------- the oracle --

def fa_visible(seq_q, length, seq_k, causal, window):
    """FA's docstring, one (query, key) pair at a time: bool (seq_q, seq_k)."""
    left, right = window
    if causal:
        right = 0
    visible = [[False] * seq_k for _ in range(seq_q)]
    for i in range(seq_q):
        position = i + length - seq_q
        for j in range(length):
            visible[i][j] = ((left < 0 or j >= position - left)
                             and (right < 0 or j <= position + right))
    return torch.tensor(visible, dtype=torch.bool).reshape(seq_q, seq_k)


def fa_attention(q, k, v, scale=None, causal=False, window=(-1, -1), key_lengths=None):
    """flash-attention's documented semantics in fp64: q (B, Tq, H, D), k, v (B, Tk, Hkv, D)
    -> out (B, Tq, H, D), lse (B, H, Tq): 0 and -inf for rows that see no key. Differentiable
    (rows without keys get zero gradients, not NaN)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    lengths = [seq_k] * batch if key_lengths is None else [int(n) for n in key_lengths]
    visible = torch.stack([fa_visible(seq_q, n, seq_k, causal, window) for n in lengths])
    visible = visible[:, None]  # (B, 1, Tq, Tk)
    kv_of_head = torch.arange(heads) // (heads // kv_heads)
    kk, vv = k[:, :, kv_of_head], v[:, :, kv_of_head]  # (B, Tk, H, D)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    sees_a_key = visible.any(-1, keepdim=True)
    # a row without keys is computed as if it saw every key, then replaced: no NaN anywhere
    scores = scores.masked_fill(~(visible | ~sees_a_key), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, vv)
    rows = sees_a_key.squeeze(-1)  # (B, 1, Tq)
    out = torch.where(rows.transpose(1, 2)[..., None], out, torch.zeros_like(out))
    lse = torch.where(rows, lse, torch.full_like(lse, float("-inf")))
    return out, lse


def fa_varlen(q, k, v, cu_q, cu_k, **options):
    """The oracle per packed sequence: out (total_q, H, D), lse (H, total_q)."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        out, lse = fa_attention(q[None, qs], k[None, ks], v[None, ks], **options)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def test_oracle_is_sdpa_where_sdpa_applies():
    """The oracle itself, where torch's SDPA states the same thing (full and causal, Tq == Tk)."""
    q, k, v = (torch.randn(2, 6, 4, 8, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        got, _ = fa_attention(q, k, v, causal=causal)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        torch.testing.assert_close(got, want.transpose(1, 2))


# FA2's positional parameters, in order (flash_attn/flash_attn_interface.py); FA3's extra
# options are keyword-only here, so an FA2 positional call means what it meant in FA2
FA2_POSITIONAL = {
    "flash_attn_func": ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size",
                        "softcap", "alibi_slopes", "deterministic", "return_attn_probs"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                               "max_seqlen_k", "dropout_p", "softmax_scale", "causal",
                               "window_size", "softcap", "alibi_slopes", "deterministic",
                               "return_attn_probs", "block_table"],
    "flash_attn_with_kvcache": ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin",
                                "cache_seqlens", "cache_batch_idx", "cache_leftpad",
                                "block_table", "softmax_scale", "causal", "window_size",
                                "softcap", "rotary_interleaved", "alibi_slopes", "num_splits",
                                "return_softmax_lse"],
}
FA_DEFAULTS = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                   softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                   return_softmax_lse=False, num_splits=0, rotary_interleaved=True)


@pytest.mark.parametrize("name", list(FA2_POSITIONAL))
def test_positional_order_and_defaults_are_fa2s(name):
    import inspect
    parameters = inspect.signature(getattr(flash_attn, name)).parameters.values()
    positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == FA2_POSITIONAL[name]
    for p in parameters:
        if p.name in FA_DEFAULTS and p.name in positional:
            assert p.default == FA_DEFAULTS[p.name], p.name
    assert gptfast.flash_attn_interface is flash_attn
    assert name in flash_attn.__all__


# ------------------------------------------------------------------------- helpers --

def leaves(*shapes, dtype):
    return [torch.randn(shape).to(dtype).requires_grad_() for shape in shapes]


def under(backend, fn, *args, **kwargs):
    """fn under ``backend``; on forced triton a case the kernels lack skips with their reason."""
    with gptfast.use_backend(backend):
        try:
            return fn(*args, **kwargs)
        except gptfast.BackendUnavailable as err:
            if backend != "triton":
                raise
            pytest.skip(f"kernel does not take this case yet: {err}")


def assert_close(name, got, want, tolerance):
    torch.testing.assert_close(got.double(), want.double(), atol=tolerance, rtol=tolerance,
                               msg=lambda m: f"{name}: {m}")


def check_forward_backward(run, oracle, inputs, dtype, backend):
    """run(*inputs) -> out under the backend; oracle(*fp64 inputs) -> out: outputs and the
    gradients of every input against the oracle's, for one random upstream gradient."""
    out = under(backend, run, *inputs)
    assert out.dtype == dtype and out.is_contiguous()
    grad_out = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    want = oracle(*exact)
    want_grads = torch.autograd.grad(want, exact, grad_out.double())
    out_tol, grad_tol = TOLERANCE[dtype]
    assert out.shape == want.shape
    assert_close("out", out, want, out_tol)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads):
        assert got.dtype == dtype and got.shape == expected.shape, name
        assert_close(name, got, expected, grad_tol)


# ---------------------------------------------------------------------- flash_attn_func --

# (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, window)
FUNC_CASES = {
    "causal": (2, 13, 13, 2, 2, 16, True, (-1, -1)),
    "causal-GQA-window3": (1, 13, 13, 4, 2, 16, True, (3, 0)),
    "causal-window0": (1, 9, 9, 2, 2, 16, True, (0, 0)),
    "causal-window-beyond-T": (1, 9, 9, 2, 1, 16, True, (50, 0)),
    "causal-ignores-right": (1, 9, 9, 2, 2, 16, True, (2, 5)),
    "MQA-causal": (1, 11, 11, 4, 1, 16, True, (-1, -1)),
    "full": (2, 10, 10, 2, 2, 16, False, (-1, -1)),
    "full-GQA-window2-3": (1, 12, 12, 4, 2, 16, False, (2, 3)),
    "full-window0-0": (1, 9, 9, 2, 2, 16, False, (0, 0)),
    "full-window-left0": (1, 9, 9, 2, 2, 16, False, (0, -1)),
    "full-window-right0-is-causal": (1, 9, 9, 2, 2, 16, False, (-1, 0)),
    "full-window-beyond-T": (1, 9, 9, 2, 2, 16, False, (20, 30)),
    "Tq<Tk-causal": (2, 5, 11, 2, 1, 16, True, (-1, -1)),
    "Tq>Tk-causal-empty-rows": (1, 9, 4, 2, 2, 16, True, (-1, -1)),
    "Tq<Tk-full-window": (1, 4, 10, 2, 2, 16, False, (2, 1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("case", list(FUNC_CASES), ids=list(FUNC_CASES))
def test_func_matches_fa_semantics(case, dtype, backend):
    batch, seq_q, seq_k, heads, kv_heads, dim, causal, window = FUNC_CASES[case]
    inputs = leaves((batch, seq_q, heads, dim), (batch, seq_k, kv_heads, dim),
                    (batch, seq_k, kv_heads, dim), dtype=dtype)
    check_forward_backward(
        lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=causal, window_size=window),
        lambda q, k, v: fa_attention(q, k, v, causal=causal, window=window)[0],
        inputs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_reads_strided_views_of_a_fused_projection(backend):
    """q, k, v as views of one (B, T, 3, H, D) projection and a scale: no copy needed."""
    qkv = torch.randn(2, 11, 3, 2, 16, requires_grad=True)
    run = lambda t: flash_attn.flash_attn_func(t[:, :, 0], t[:, :, 1], t[:, :, 2],  # noqa: E731
                                               softmax_scale=0.3, causal=True)
    oracle = lambda t: fa_attention(t[:, :, 0], t[:, :, 1], t[:, :, 2], 0.3, True)[0]  # noqa: E731
    check_forward_backward(run, oracle, [qkv], torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window,seq_k", [(True, (-1, -1), 6), (False, (1, 2), 9),
                                                 (True, (2, 0), 4)])
def test_func_return_conventions_and_lse(backend, causal, window, seq_k):
    q, k, v = (torch.randn(2, 6, 2, 8), torch.randn(2, seq_k, 1, 8), torch.randn(2, seq_k, 1, 8))
    want_out, want_lse = fa_attention(q, k, v, causal=causal, window=window)
    options = dict(causal=causal, window_size=window)
    plain = under(backend, flash_attn.flash_attn_func, q, k, v, **options)
    assert isinstance(plain, torch.Tensor)
    for flag in ("return_softmax_lse", "return_lse"):  # FA3 / FA4 spellings: (out, lse)
        out, lse = under(backend, flash_attn.flash_attn_func, q, k, v, **options, **{flag: True})
        assert lse.shape == (2, 2, 6) and lse.dtype == torch.float32
        assert_close("out", out, want_out, 2e-5)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        finite = torch.isfinite(want_lse)
        assert_close("lse", lse[finite], want_lse[finite], 2e-5)
    # FA2: (out, softmax_lse, S_dmask), S_dmask empty without dropout
    out, lse, s_dmask = under(backend, flash_attn.flash_attn_func, q, k, v, 0.0, None, causal,
                              window, return_attn_probs=True)
    assert s_dmask.numel() == 0
    assert_close("out", out, want_out, 2e-5)


def test_rows_that_see_no_key_are_zero_with_lse_minus_inf():
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    out, lse = flash_attn.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()


# --------------------------------------------------------------- flash_attn_varlen_func --

# (sequence lengths, heads, kv_heads, causal, window)
VARLEN_CASES = {
    "causal-lengths-1": ([1, 5, 1, 7], 2, 2, True, (-1, -1)),
    "causal-one-document": ([13], 4, 2, True, (-1, -1)),
    "causal-GQA-window2": ([4, 1, 8], 4, 2, True, (2, 0)),
    "full": ([3, 1, 6], 2, 1, False, (-1, -1)),
    "full-window1-2": ([6, 1, 5], 2, 2, False, (1, 2)),
    "full-one-document-window0": ([9], 2, 2, False, (0, 0)),
}


def packed(lengths, heads, kv_heads, dtype, dim=16):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return cu, leaves((total, heads, dim), (total, kv_heads, dim), (total, kv_heads, dim),
                      dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=list(VARLEN_CASES))
def test_varlen_shared_cu_seqlens_matches_fa_semantics(case, dtype, backend):
    lengths, heads, kv_heads, causal, window = VARLEN_CASES[case]
    cu, inputs = packed(lengths, heads, kv_heads, dtype)
    longest = max(lengths)
    check_forward_backward(
        lambda q, k, v: flash_attn.flash_attn_varlen_func(
            q, k, v, cu, cu, longest, longest, causal=causal, window_size=window),
        lambda q, k, v: fa_varlen(q, k, v, cu.tolist(), cu.tolist(), causal=causal,
                                  window=window)[0],
        inputs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (1, 0)),
                                           (False, (2, 1))])
def test_varlen_different_query_and_key_lengths(causal, window, dtype, backend):
    """Per-sequence Tq != Tk (more, fewer, no keys, no queries): bottom-right aligned within
    each sequence, through the padded path."""
    lengths_q, lengths_k = [3, 1, 4, 0, 2], [5, 1, 2, 3, 0]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    inputs = leaves((sum(lengths_q), 4, 16), (sum(lengths_k), 2, 16), (sum(lengths_k), 2, 16),
                    dtype=dtype)
    check_forward_backward(
        lambda q, k, v: flash_attn.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 4, 5, causal=causal, window_size=window),
        lambda q, k, v: fa_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), causal=causal,
                                  window=window)[0],
        inputs, dtype, backend)


def test_varlen_lse_layout_and_both_paths_agree(monkeypatch):
    """softmax_lse is (H, total_q); equal cu_seqlens in two tensors take the document path
    (eager), and the padded path gives the same answer."""
    cu, (q, k, v) = packed([2, 1, 5], 2, 1, torch.float32)
    want_out, want_lse = fa_varlen(q, k, v, cu.tolist(), cu.tolist(), causal=True)
    out, lse = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 5, 5, causal=True,
                                                 return_softmax_lse=True)
    assert lse.shape == (2, 8)
    assert_close("out", out, want_out, 2e-5)
    assert_close("lse", lse, want_lse, 2e-5)

    def refuse(*args, **kwargs):
        raise AssertionError("equal cu_seqlens took the padded path")
    with monkeypatch.context() as patch:
        patch.setattr(flash_attn, "_varlen_padded", refuse)
        flash_attn.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 5, 5, causal=True)
    padded, padded_lse = flash_attn._varlen_padded(q, k, v, cu, cu, 5, 5, None, True, -1, -1, True)
    assert_close("padded out", padded, want_out, 2e-5)
    assert_close("padded lse", padded_lse, want_lse, 2e-5)
    out3 = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True,
                                             return_attn_probs=True)
    assert len(out3) == 3 and out3[2].numel() == 0


def test_varlen_max_seqlen_none_reads_the_lengths():
    lengths_q, lengths_k = [2, 3], [4, 1]
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 5], dtype=torch.int32)
    q, k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, None, None, causal=True)
    assert_close("out", out, fa_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), causal=True)[0], 2e-5)
    assert sum(lengths_q) == out.shape[0] and sum(lengths_k) == k.shape[0]


# -------------------------------------------------------------- flash_attn_with_kvcache --

def kvcache_oracle(q, k_cache, v_cache, k, v, cache_seqlens, **options):
    """Expected caches after the append, and the oracle's output over them."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch = q.shape[0]
    seqlens = torch.as_tensor(cache_seqlens).expand(batch).tolist()
    new = 0 if k is None else k.shape[1]
    for b, start in enumerate(seqlens):
        if new:
            k_cache[b, start:start + new] = k[b]
            v_cache[b, start:start + new] = v[b]
    lengths = torch.tensor(seqlens) + new
    out, lse = fa_attention(q, k_cache[:batch], v_cache[:batch], key_lengths=lengths, **options)
    return k_cache, v_cache, out, lse


# (batch, cache_batch, cache_len, seq_q, seq_new, heads, kv_heads, cache_seqlens, causal, window)
KVCACHE_CASES = {
    "decode-rows-at-0-3-7": (3, 3, 10, 1, 1, 4, 2, [0, 3, 7], True, (-1, -1)),
    "prefill-chunk-Tq2-new2": (3, 4, 12, 2, 2, 2, 2, [0, 5, 9], True, (-1, -1)),
    "Tq3-new2-window2": (2, 2, 10, 3, 2, 2, 1, [4, 1], True, (2, 0)),
    "full-window1-1": (2, 2, 9, 2, 2, 2, 2, [3, 6], False, (1, 1)),
    "int-seqlens": (2, 2, 8, 2, 2, 4, 1, 3, True, (-1, -1)),
    "no-new-keys": (2, 2, 8, 2, 0, 2, 2, [5, 2], True, (-1, -1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("case", list(KVCACHE_CASES), ids=list(KVCACHE_CASES))
def test_kvcache_appends_in_place_and_matches_fa_semantics(case, dtype, backend):
    (batch, cache_batch, cache_len, seq_q, new, heads, kv_heads, seqlens, causal,
     window) = KVCACHE_CASES[case]
    dim = 16
    q = torch.randn(batch, seq_q, heads, dim).to(dtype)
    k_cache = torch.randn(cache_batch, cache_len, kv_heads, dim).to(dtype)
    v_cache = torch.randn(cache_batch, cache_len, kv_heads, dim).to(dtype)
    k = v = None
    if new:
        k = torch.randn(batch, new, kv_heads, dim).to(dtype)
        v = torch.randn(batch, new, kv_heads, dim).to(dtype)
    cache_seqlens = (seqlens if isinstance(seqlens, int)
                     else torch.tensor(seqlens, dtype=torch.int32))
    want_k, want_v, want_out, want_lse = kvcache_oracle(q, k_cache, v_cache, k, v, seqlens,
                                                        causal=causal, window=window)
    k_ptr = k_cache.data_ptr()
    out, lse = under(backend, flash_attn.flash_attn_with_kvcache, q, k_cache, v_cache, k, v,
                     cache_seqlens=cache_seqlens, causal=causal, window_size=window,
                     return_softmax_lse=True)
    assert k_cache.data_ptr() == k_ptr
    assert torch.equal(k_cache, want_k.to(dtype)) and torch.equal(v_cache, want_v.to(dtype))
    assert out.shape == q.shape and out.dtype == dtype
    assert_close("out", out, want_out, TOLERANCE[dtype][0])
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    assert_close("lse", lse[finite], want_lse[finite], TOLERANCE[dtype][0])


def test_kvcache_without_seqlens_attends_to_the_whole_cache():
    q, k_cache, v_cache = torch.randn(2, 3, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    assert_close("out", out, fa_attention(q, k_cache, v_cache, causal=True)[0], 2e-5)


def test_kvcache_has_no_backward():
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    k_cache, v_cache = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=2)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_kvcache_custom_op_passes_opcheck():
    q = torch.randn(2, 2, 4, 8)
    k_cache, v_cache = torch.randn(3, 9, 2, 8), torch.randn(3, 9, 2, 8)
    k, v = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    seqlens = torch.tensor([1, 6], dtype=torch.int32)
    op = torch.ops.gptfast.flash_attn_with_kvcache.default
    torch.library.opcheck(op, (q, k_cache, v_cache, k, v, seqlens, None, True, -1, 0, True))
    torch.library.opcheck(op, (q, k_cache, v_cache, None, None, None, 0.5, False, 2, 1, False))


# ------------------------------------------------------------------- what is refused --

def _func(**kw):
    q = torch.randn(1, 4, 2, 8)
    return flash_attn.flash_attn_func(q, q, q, **kw)


def _varlen(**kw):
    q, cu = torch.randn(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)
    return flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, **{"max_seqlen_q": 4,
                                                                 "max_seqlen_k": 4, **kw})


def _kvcache(**kw):
    q, cache = torch.randn(1, 1, 2, 8), torch.zeros(1, 4, 2, 8)
    return flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), **kw)


ANY = torch.ones(2)
NOT_IMPLEMENTED = [
    (_func, dict(dropout_p=0.1), "dropout_p"),
    (_func, dict(softcap=30.0), "softcap"),
    (_func, dict(alibi_slopes=ANY), "alibi_slopes"),
    (_func, dict(qv=ANY), "qv"),
    (_func, dict(q_descale=ANY), "q_descale"),
    (_func, dict(attention_chunk=2), "attention_chunk"),
    (_varlen, dict(dropout_p=0.5), "dropout_p"),
    (_varlen, dict(softcap=1.0), "softcap"),
    (_varlen, dict(block_table=ANY), "block_table"),
    (_varlen, dict(seqused_k=ANY), "seqused_k"),
    (_varlen, dict(seqused_q=ANY), "seqused_q"),
    (_varlen, dict(v_descale=ANY), "v_descale"),
    (_kvcache, dict(rotary_cos=ANY, rotary_sin=ANY), "rotary_cos"),
    (_kvcache, dict(cache_batch_idx=ANY), "cache_batch_idx"),
    (_kvcache, dict(cache_leftpad=ANY), "cache_leftpad"),
    (_kvcache, dict(block_table=ANY), "block_table"),
    (_kvcache, dict(page_table=ANY), "page_table"),
    (_kvcache, dict(cu_seqlens_q=ANY), "cu_seqlens_q"),
    (_kvcache, dict(alibi_slopes=ANY), "alibi_slopes"),
    (_kvcache, dict(softcap=5.0), "softcap"),
    (_kvcache, dict(k_descale=ANY), "k_descale"),
]


@pytest.mark.parametrize("entry,kwargs,name", NOT_IMPLEMENTED,
                         ids=[f"{e.__name__[1:]}-{n}" for e, _, n in NOT_IMPLEMENTED])
def test_unsupported_options_raise_not_implemented_naming_them(entry, kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        entry(**kwargs)


def test_v_head_dim_other_than_k_is_not_implemented():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="head dim"):
        flash_attn.flash_attn_func(q, k, torch.randn(1, 4, 2, 16))


def test_hints_that_change_no_result_are_accepted():
    q = torch.randn(1, 5, 2, 8)
    want = flash_attn.flash_attn_func(q, q, q, causal=True)
    got = flash_attn.flash_attn_func(q, q, q, causal=True, deterministic=True, num_splits=4,
                                     pack_gqa=True, sm_margin=8, softcap=0.0, dropout_p=0.0)
    assert torch.equal(got, want)


BAD_INPUT = [
    (_func, dict(window_size=(-2, 0)), ValueError, "window_size left"),
    (_func, dict(window_size=(0, -3)), ValueError, "window_size right"),
    (_func, dict(window_size=4), TypeError, "window_size"),
    (_func, dict(window_size=(1.5, 0)), TypeError, "window_size left"),
    (_func, dict(causal=1), TypeError, "causal"),
    (_func, dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (_func, dict(softmax_scale=True), TypeError, "softmax_scale"),
    (_func, dict(dropout_p=None), TypeError, "dropout_p"),
    (_func, dict(dropout_p=1.5), ValueError, "dropout_p"),
    (_func, dict(softcap=-1.0), ValueError, "softcap"),
    (_func, dict(return_attn_probs=True, return_softmax_lse=True), ValueError, "return_attn_probs"),
    (_func, dict(deterministic="yes"), TypeError, "deterministic"),
    (_varlen, dict(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    (_kvcache, dict(cache_seqlens=4, k=torch.randn(1, 1, 2, 8), v=torch.randn(1, 1, 2, 8)),
     ValueError, "cache_seqlens"),
    (_kvcache, dict(cache_seqlens=torch.tensor([9], dtype=torch.int32)), ValueError,
     "cache_seqlens"),
    (_kvcache, dict(cache_seqlens=torch.tensor([1.0])), ValueError, "cache_seqlens"),
    (_kvcache, dict(k=torch.randn(1, 1, 2, 8), cache_seqlens=0), ValueError, "k and v"),
    (_kvcache, dict(k=torch.randn(1, 1, 2, 8), v=torch.randn(1, 1, 2, 8)), ValueError,
     "cache_seqlens is required"),
    (_kvcache, dict(k=torch.randn(1, 1, 3, 8), v=torch.randn(1, 1, 3, 8), cache_seqlens=0),
     ValueError, "k must be"),
]


@pytest.mark.parametrize("entry,kwargs,error,match", BAD_INPUT,
                         ids=[f"{e.__name__[1:]}-{m}" for e, _, _, m in BAD_INPUT])
def test_bad_input_names_the_argument(entry, kwargs, error, match):
    with pytest.raises(error, match=match):
        entry(**kwargs)


def test_bad_shapes_name_the_argument():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q must be"):
        flash_attn.flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match="multiple"):
        flash_attn.flash_attn_func(torch.randn(1, 4, 3, 8), q, q)
    with pytest.raises(ValueError, match="batch"):
        flash_attn.flash_attn_func(q, torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8))
    with pytest.raises(TypeError, match="dtype"):
        flash_attn.flash_attn_func(q, q.double(), q.double())
    packed_q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        flash_attn.flash_attn_varlen_func(packed_q, packed_q, packed_q, cu.float(), cu, 4, 4)
    for bad, what in (([0, 3], "end at"), ([1, 4], "start at 0"), ([0, 3, 2, 4], "non-decreasing")):
        bad = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match=what):
            flash_attn.flash_attn_varlen_func(packed_q, packed_q, packed_q, bad, bad, 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        flash_attn.flash_attn_varlen_func(packed_q, packed_q, packed_q, cu, cu, 4, 3)
    with pytest.raises(ValueError, match="as many sequences"):
        flash_attn.flash_attn_varlen_func(packed_q, packed_q, packed_q, cu,
                                          torch.tensor([0, 2, 4], dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="k_cache holds"):
        flash_attn.flash_attn_with_kvcache(torch.randn(2, 1, 2, 8), torch.zeros(1, 4, 2, 8),
                                           torch.zeros(1, 4, 2, 8))


# ------------------------------------------------------------------------ torch.compile --

def assert_no_graph_breaks(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    reasons = [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def _compiled_matches_eager(fn, inputs, backend):
    """No graph break; the fullgraph compile equals eager, values and gradients."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    leaves_ = [t for t in inputs if t.requires_grad]
    expected = under(backend, fn, *inputs)
    expected_grads = torch.autograd.grad(expected.sum(), leaves_)
    with gptfast.use_backend(backend):
        assert_no_graph_breaks(fn, *inputs)
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
        got_grads = torch.autograd.grad(got.sum(), leaves_)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("causal,window", [(True, (3, 0)), (False, (2, 2))])
def test_func_compiles_without_graph_breaks(backend, causal, window):
    def fn(q, k, v):
        return flash_attn.flash_attn_func(q, k, v, causal=causal, window_size=window)
    _compiled_matches_eager(fn, [torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16),
                                 torch.randn(2, 9, 2, 16)], backend)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_varlen_compiles_without_graph_breaks(backend):
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)

    def fn(q, k, v, cu):
        return flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True,
                                                 window_size=(2, 0))
    _compiled_matches_eager(fn, [torch.randn(10, 2, 16), torch.randn(10, 1, 16),
                                 torch.randn(10, 1, 16), cu], backend)


def test_varlen_padded_path_compiles_without_graph_breaks():
    cu_q = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 5, 7], dtype=torch.int32)

    def fn(q, k, v, cu_q, cu_k):
        return flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, causal=True)
    _compiled_matches_eager(fn, [torch.randn(6, 2, 16), torch.randn(7, 2, 16),
                                 torch.randn(7, 2, 16), cu_q, cu_k], "auto")


def test_kvcache_compiles_without_graph_breaks_and_mutates_the_caches():
    q, k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    seqlens = torch.tensor([2, 5], dtype=torch.int32)
    caches = [torch.randn(2, 8, 2, 16) for _ in range(2)]
    eager_caches = [c.clone() for c in caches]

    def fn(q, k_cache, v_cache, k, v, seqlens):
        return flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v,
                                                  cache_seqlens=seqlens, causal=True)
    assert_no_graph_breaks(fn, q, *[c.clone() for c in caches], k, v, seqlens)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, *caches, k, v, seqlens)
    want = fn(q, *eager_caches, k, v, seqlens)
    assert torch.equal(got, want)
    assert torch.equal(caches[0], eager_caches[0]) and torch.equal(caches[1], eager_caches[1])


def test_changing_windows_and_cu_seqlens_values_recompiles_at_most_once():
    """Dynamo specialises an int on the first call and makes it dynamic on the second value;
    tensor values (cu_seqlens, cache_seqlens) never recompile."""
    q, k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def varlen(q, k, v, cu, left):
        return flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, causal=True,
                                                 window_size=(left, 0))
    for left, cu in ((2, [0, 3, 10]), (3, [0, 3, 10]), (5, [0, 6, 10]), (7, [0, 1, 10]),
                     (4, [0, 5, 10])):
        cu = torch.tensor(cu, dtype=torch.int32)
        got = varlen(q, k, v, cu, left)
        want = fa_varlen(q, k, v, cu.tolist(), cu.tolist(), causal=True, window=(left, 0))[0]
        assert_close(f"left={left}", got, want, 2e-5)
    assert counter.frame_count == 2

    counter = CompileCounter()
    torch._dynamo.reset()
    cache = torch.zeros(2, 8, 2, 16)

    @torch.compile(backend=counter, fullgraph=True)
    def decode(q, k, v, seqlens, left):
        return flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), k, v,
                                                  cache_seqlens=seqlens, causal=True,
                                                  window_size=(left, 0))
    step = torch.randn(2, 1, 2, 16)
    for left, seqlens in ((2, [0, 1]), (3, [4, 2]), (5, [6, 7])):
        decode(step, step, step, torch.tensor(seqlens, dtype=torch.int32), left)
    assert counter.frame_count == 2
