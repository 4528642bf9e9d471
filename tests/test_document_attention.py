"""Document-masked and sliding-window causal attention (``document_ids``, ``window``).

The kernels run through the Triton interpreter on CPU (fp32, fp16 and bf16) against
``gptfast.reference`` in fp64 with the explicit boolean mask; the model's "document" attention
and its KV-cache generation against full recomputation with the same ids.
"""

import pytest
import torch
import torch._dynamo

import gptfast
from gptfast import GPT, GPTConfig, reference
from gptfast.testing import bf16_tolerance

attention = pytest.importorskip("gptfast.kernels.attention")

TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (3e-3, 8e-3)}
TOLERANCE[torch.bfloat16] = bf16_tolerance(TOLERANCE[torch.float16])


def make_qkv(batch, heads, kv_heads, seq, head_dim, dtype=torch.float32):
    shape_q, shape_kv = (batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim)
    return tuple(torch.randn(shape, dtype=dtype).requires_grad_()
                 for shape in (shape_q, shape_kv, shape_kv))


def ids_from_starts(seq, starts, batch=1):
    """(batch, seq) document ids with documents beginning at ``starts`` (0 implied)."""
    begins = torch.zeros(seq, dtype=torch.long)
    begins[[s for s in starts if 0 < s < seq]] = 1
    return torch.cumsum(begins, 0).expand(batch, seq).clone()


def random_ids(batch, seq, mean_length, generator):
    begins = torch.rand(batch, seq, generator=generator) < 1.0 / mean_length
    return torch.cumsum(begins.long(), dim=1) + 3  # any offset: only equality matters


def reference_fp64(q, k, v, grad_out, document_ids, window, scale=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.causal_attention_math(q64, k64, v64, scale, document_ids, window)
    out.backward(grad_out.double())
    return out.detach(), (q64.grad, k64.grad, v64.grad)


def run(q, k, v, grad_out, document_ids, window, scale=None):
    for t in (q, k, v):
        t.grad = None
    out = gptfast.causal_attention(q, k, v, scale, document_ids=document_ids, window=window)
    out.backward(grad_out)
    return out.detach(), (q.grad.clone(), k.grad.clone(), v.grad.clone())


def assert_matches_reference(q, k, v, document_ids=None, window=None, scale=None):
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    out, grads = run(q, k, v, grad_out, document_ids, window, scale)
    want_out, want_grads = reference_fp64(q, k, v, grad_out, document_ids, window, scale)
    out_tol, grad_tol = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), want_out, atol=out_tol, rtol=out_tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        torch.testing.assert_close(got.double(), want, atol=grad_tol, rtol=grad_tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# Interpreter tiles: forward and dQ 32 query rows x 16 keys, dK/dV 32 keys x 16 query rows.
# (batch, heads, kv_heads, seq, head_dim, document starts or "random", window)
CASES = {
    "random-docs": (2, 2, 2, 77, 16, "random", None),
    "starts-on-tile-edges": (1, 2, 1, 96, 16, [16, 32, 64], None),
    "starts-off-tile-edges": (1, 2, 2, 70, 16, [5, 33, 47, 48, 69], None),
    "one-token-documents": (1, 2, 2, 40, 16, [3, 4, 5, 6, 20, 21, 39], None),
    "window-1": (1, 2, 2, 37, 16, None, 1),
    "window-20": (2, 2, 1, 83, 16, None, 20),
    "window-and-docs": (2, 2, 2, 75, 16, "random", 13),
    "GQA-H4-Hkv2-docs-window": (1, 4, 2, 50, 24, [7, 30], 9),
}


def case_inputs(case, dtype=torch.float32):
    batch, heads, kv_heads, seq, head_dim, starts, window = case
    q, k, v = make_qkv(batch, heads, kv_heads, seq, head_dim, dtype)
    if starts == "random":
        ids = random_ids(batch, seq, 12, torch.Generator().manual_seed(seq))
    elif starts is None:
        ids = None
    else:
        ids = ids_from_starts(seq, starts, batch)
    return q, k, v, ids, window


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_matches_masked_reference(triton_backend, case):
    q, k, v, ids, window = case_inputs(case)
    assert_matches_reference(q, k, v, ids, window)


@pytest.mark.parametrize("case", [CASES["random-docs"], CASES["window-and-docs"]],
                         ids=["random-docs", "window-and-docs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_masked_reference(triton_backend, case, dtype):
    q, k, v, ids, window = case_inputs(case, dtype)
    assert_matches_reference(q, k, v, ids, window)


@pytest.mark.parametrize("case", [CASES["random-docs"], CASES["GQA-H4-Hkv2-docs-window"]],
                         ids=["random-docs", "GQA-docs-window"])
def test_atomic_dq_path_matches_masked_reference(triton_backend, case):
    q, k, v, ids, window = case_inputs(case)
    previous = attention.set_atomic_dq(True)
    try:
        assert_matches_reference(q, k, v, ids, window)
    finally:
        attention.set_atomic_dq(previous)


def test_one_document_and_wide_window_equal_plain_causal_bit_for_bit(triton_backend):
    q, k, v = make_qkv(2, 2, 1, 45, 16)
    grad_out = torch.randn(q.shape)
    plain = run(q, k, v, grad_out, None, None)
    for ids, window in ((torch.full((2, 45), 7), None), (None, 45), (None, 1000),
                        (torch.zeros(2, 45, dtype=torch.int32), 45)):
        out, grads = run(q, k, v, grad_out, ids, window)
        assert torch.equal(out, plain[0])
        for got, want in zip(grads, plain[1]):
            assert torch.equal(got, want)


def test_plain_call_with_none_masks_is_the_unmasked_kernel_bit_for_bit(triton_backend):
    q, k, v = make_qkv(1, 2, 2, 40, 16)
    grad_out = torch.randn(q.shape)
    out, grads = run(q, k, v, grad_out, None, None)
    with torch.no_grad():
        o, lse2 = attention.attention_forward(q, k, v, 16 ** -0.5)
        want_grads = attention.attention_backward(grad_out, q, k, v, o, lse2, 16 ** -0.5)
    assert torch.equal(out, o)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["deterministic-dq", "atomic-dq"])
def test_tiles_no_query_may_see_are_never_read(triton_backend, atomic_dq):
    """Documents on tile edges (interpreter tiles are 32 rows): NaN in the keys/values of
    document 0 and in the queries/output gradients of document 2 must not reach anything of
    document 1, so no kernel visits a tile of another document (a masked visit would still
    spread the NaN through the matmuls)."""
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 96, 16))
    grad_out = torch.randn(q.shape)
    k[:, :, :32] = v[:, :, :32] = float("nan")
    q[:, :, 64:] = grad_out[:, :, 64:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ids = ids_from_starts(96, [32, 64])
    previous = attention.set_atomic_dq(atomic_dq)
    try:
        out, (dq, dk, dv) = run(q, k, v, grad_out, ids, None)
    finally:
        attention.set_atomic_dq(previous)
    middle = slice(32, 64)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t[:, :, middle]).all(), name
    q64, k64, v64 = (t.detach()[:, :, middle].double().requires_grad_() for t in (q, k, v))
    want = reference.causal_attention(q64, k64, v64)
    want.backward(grad_out[:, :, middle].double())
    torch.testing.assert_close(out[:, :, middle].double(), want.detach(), atol=1e-5, rtol=1e-5)
    for got, expected in zip((dq, dk, dv), (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got[:, :, middle].double(), expected, atol=1e-4, rtol=1e-4)


def test_custom_ops_with_masks_pass_opcheck():
    q, k, v = make_qkv(1, 2, 1, 8, 16)
    ids = ids_from_starts(8, [3])
    forward, backward = (torch.ops.gptfast.causal_attention_forward.default,
                         torch.ops.gptfast.causal_attention_backward.default)
    torch.library.opcheck(forward, (q, k, v, 0.25, ids, 4))
    out, lse2 = forward(q, k, v, 0.25, ids, 4)
    saved = (q.detach(), k.detach(), v.detach(), out.detach(), lse2)
    torch.library.opcheck(backward, (torch.randn_like(out), *saved, 0.25, False, ids, 4))


def test_every_row_sees_itself_with_window_1(triton_backend):
    """window=1 and one-token documents: each row's output is its own value row."""
    q, k, v = make_qkv(1, 2, 2, 33, 16)
    with torch.no_grad():
        out = gptfast.causal_attention(q, k, v, window=1)
        out_docs = gptfast.causal_attention(q, k, v, document_ids=torch.arange(33)[None])
    torch.testing.assert_close(out, v.detach())
    torch.testing.assert_close(out_docs, v.detach())


def test_reference_mask_matches_sdpa_reference():
    q, k, v = (t.detach().double() for t in make_qkv(2, 2, 1, 30, 8))
    ids = random_ids(2, 30, 6, torch.Generator().manual_seed(0))
    for window in (None, 1, 7):
        torch.testing.assert_close(reference.causal_attention(q, k, v, None, ids, window),
                                   reference.causal_attention_math(q, k, v, None, ids, window))


def test_reference_mask_is_the_stated_rule():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    visible = reference.attention_mask(6, 6, ids, window=2)[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(visible[i, j]) == (j <= i and i - 2 < j and int(ids[0, j]) == int(ids[0, i]))


# --------------------------------------------------------------------------- bad input --

BAD = {
    "float ids": (lambda b, t: torch.zeros(b, t), None, TypeError, "document_ids"),
    "bool ids": (lambda b, t: torch.zeros(b, t, dtype=torch.bool), None, TypeError, "document_ids"),
    "list ids": (lambda b, t: [[0] * t] * b, None, TypeError, "document_ids"),
    "wrong shape": (lambda b, t: torch.zeros(b, t + 1, dtype=torch.long), None, ValueError,
                    "document_ids"),
    "1-D ids": (lambda b, t: torch.zeros(t, dtype=torch.long), None, ValueError, "document_ids"),
    "decreasing": (lambda b, t: torch.tensor([[0, 1, 1, 0, 2]] * b), None, ValueError,
                   "non-decreasing"),
    "meta ids": (lambda b, t: torch.zeros(b, t, dtype=torch.long, device="meta"), None, ValueError,
                 "document_ids"),
    "window 0": (None, 0, ValueError, "window"),
    "window -3": (None, -3, ValueError, "window"),
    "window bool": (None, True, TypeError, "window"),
    "window float": (None, 2.0, TypeError, "window"),
    "window tensor": (None, torch.tensor(2), TypeError, "window"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_masks_raise_naming_the_argument(backend, bad):
    make_ids, window, error, match = bad
    q, k, v = make_qkv(2, 2, 2, 5, 8)
    ids = None if make_ids is None else make_ids(2, 5)
    with gptfast.use_backend(backend), pytest.raises(error, match=match):
        gptfast.causal_attention(q, k, v, document_ids=ids, window=window)


def test_masks_are_keyword_only():
    q, k, v = make_qkv(1, 1, 1, 4, 8)
    with pytest.raises(TypeError):
        gptfast.causal_attention(q, k, v, None, torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------ torch.compile --

@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph_with_masks(backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 1, 24, 16)
    ids = ids_from_starts(24, [5, 17])

    def loss_of(q, k, v, ids):
        return gptfast.causal_attention(q, k, v, document_ids=ids, window=9).square().sum()

    with gptfast.use_backend(backend):
        explained = torch._dynamo.explain(loss_of)(q, k, v, ids)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        got = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(q, k, v, ids)
        got_grads = torch.autograd.grad(got, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.causal_attention_math(q64, k64, v64, None, ids, 9).square().sum()
    want_grads = torch.autograd.grad(want, (q64, k64, v64))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


# -------------------------------------------------------------------------------- model --

EOT = 5


def small_config(**overrides):
    fields = dict(block_size=32, vocab_size=23, n_layer=2, n_head=2, n_embd=32, eot_token=EOT)
    return GPTConfig(**{**fields, **overrides})


def tokens_with_documents(batch=2, seq=20):
    idx = torch.randint(0, 23, (batch, seq), generator=torch.Generator().manual_seed(3))
    idx[idx == EOT] = 0
    idx[0, [4, 5, 13]] = EOT
    idx[1, [0, 17]] = EOT
    return idx


def test_config_validates_attention_fields():
    for bad, match in ((dict(attention="sliding"), "attention"), (dict(window=0), "window"),
                       (dict(window=True), "window"), (dict(eot_token=-1), "eot_token"),
                       (dict(attention="document", eot_token=23), "eot_token")):
        with pytest.raises(ValueError, match=match):
            small_config(**bad)
    assert GPTConfig().attention == "causal" and GPTConfig().eot_token == 50256
    assert GPTConfig(vocab_size=61).window is None  # a default eot beyond a small vocab is fine


def test_document_ids_begin_at_each_eot_token():
    model = GPT(small_config(attention="document"))
    idx = torch.tensor([[1, EOT, 2, 3, EOT, EOT, 4]])
    assert model.document_ids_of(idx).tolist() == [[0, 1, 1, 1, 2, 3, 3]]


@pytest.mark.parametrize("window", [None, 6])
def test_document_model_equals_causal_model_fed_the_same_ids(window):
    torch.manual_seed(0)
    derived = GPT(small_config(attention="document", window=window))
    explicit = GPT(small_config(window=window))
    explicit.load_state_dict(derived.state_dict())
    idx = tokens_with_documents()
    targets = torch.roll(idx, -1, 1)
    logits, loss = derived(idx, targets)
    ids = torch.cumsum(idx == EOT, dim=1)
    logits_explicit, loss_explicit = explicit(idx, targets, document_ids=ids)
    assert torch.equal(logits, logits_explicit) and torch.equal(loss, loss_explicit)
    plain, _ = explicit(idx, targets)
    assert not torch.allclose(plain, logits)  # the masks change the answer
    # the masks confine each position: the first document's logits ignore what follows it
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 4
    changed[0, 13] = EOT
    assert torch.equal(derived(changed, targets)[0][0, :5], logits[0, :5])


def test_model_masks_run_on_the_kernels(triton_backend):
    torch.manual_seed(0)
    model = GPT(small_config(attention="document", window=7))
    idx = tokens_with_documents()
    logits, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    with gptfast.use_backend("reference"):
        want, want_loss = model(idx, torch.roll(idx, -1, 1))
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields", [dict(attention="document"), dict(window=4),
                                    dict(attention="document", window=5)],
                         ids=["document", "window", "document-window"])
def test_kv_cache_steps_equal_full_recompute_under_masks(fields):
    torch.manual_seed(0)
    model = GPT(small_config(**fields)).eval()
    idx = tokens_with_documents(seq=22)
    with torch.no_grad():
        full = model.lm_head(model.hidden_states(idx))
        caches = [gptfast.nn.KVCache(32) for _ in model.transformer.h]
        steps = [model.lm_head(model.hidden_states(idx[:, :7], caches))]
        steps += [model.lm_head(model.hidden_states(idx[:, t:t + 1], caches))
                  for t in range(7, 22)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields", [dict(attention="document", window=6),
                                    dict(attention="document")], ids=["document-window", "document"])
def test_generate_with_cache_equals_without_under_masks(fields):
    torch.manual_seed(1)
    # a tiny vocabulary, so sampled tokens hit the eot token and start new documents
    model = GPT(small_config(vocab_size=8, block_size=16, **fields)).eval()
    idx = torch.tensor([[1, 2, EOT, 3], [EOT, 4, 4, 1]])
    torch.manual_seed(2)
    cached = model.generate(idx, 20, temperature=1.0, use_cache=True)
    torch.manual_seed(2)
    recomputed = model.generate(idx, 20, temperature=1.0, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert (cached[:, 4:] == EOT).any()  # the continuation crossed a document boundary


def test_model_compiles_fullgraph_with_document_attention():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(small_config(attention="document", window=6))
    idx = tokens_with_documents()
    targets = torch.roll(idx, -1, 1)

    def loss_of(idx, targets):
        return model(idx, targets)[1]

    explained = torch._dynamo.explain(loss_of)(idx, targets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    got = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(idx, targets)
    torch.testing.assert_close(got, loss_of(idx, targets), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_attention_module_applies_masks_with_attention_dropout():
    """Training with dropout > 0 runs SDPA with the explicit mask: a document's outputs do
    not depend on the tokens of the next one (same dropout draws: same seed, same shapes)."""
    module = gptfast.nn.CausalSelfAttention(32, 2, dropout=0.5, window=4).train()
    x = torch.randn(1, 12, 32)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 6, 32)
    ids = ids_from_starts(12, [6])
    torch.manual_seed(5)
    out = module(x, document_ids=ids)
    torch.manual_seed(5)
    out_changed = module(changed, document_ids=ids)
    assert torch.equal(out[:, :6], out_changed[:, :6])
    assert not torch.equal(out[:, 6:], out_changed[:, 6:])
    with pytest.raises(ValueError, match="window"):
        gptfast.nn.CausalSelfAttention(32, 2, window=0)
    with pytest.raises(ValueError, match="document_ids"):
        module(x, document_ids=ids[:, :5])


@pytest.mark.parametrize("case", ["window-and-docs", "GQA-H4-Hkv2-docs-window"])
def test_tma_path_matches_masked_reference(triton_backend, monkeypatch, case):
    """The tensor-descriptor data path (interpreter) under document and window masks."""
    from triton.runtime import interpreter
    made = []
    build = interpreter.InterpreterBuilder.create_make_tensor_descriptor
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_make_tensor_descriptor",
                        lambda self, *a, **kw: made.append(a) or build(self, *a, **kw))
    monkeypatch.setattr(attention, "_INTERPRET_TMA", True)
    q, k, v, ids, window = case_inputs(CASES[case])
    assert_matches_reference(q, k, v, ids, window)
    assert made, "the TMA path built no tensor descriptor"
