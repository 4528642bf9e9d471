"""attn_implementation="gptfast" (gptfast.hf): tiny Hugging Face models built from configs give
eager's logits and gradients, with windows, packed sequences and the SDPA fallback."""

import inspect
import logging

import pytest
import torch

import gptfast
from gptfast import functional, hf

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import sliding_window_causal_mask_function  # noqa: E402
from transformers.masking_utils import sdpa_mask as _sdpa_mask  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)
VOCAB, LAYERS = 97, 2
# transformers 4.x's mask builders take cache_position (the query positions) where 5.x takes
# q_length and q_offset
_POSITIONS = "q_length" not in inspect.signature(_sdpa_mask).parameters


def versioned(kwargs):
    """Mask-builder keywords as this transformers' create_*_mask passes them."""
    if not _POSITIONS:
        return kwargs
    kwargs = dict(kwargs)
    q_length, q_offset = kwargs.pop("q_length"), kwargs.pop("q_offset", 0)
    return {**kwargs, "cache_position": torch.arange(q_offset, q_offset + q_length)}


def sdpa_mask(**kwargs):
    return _sdpa_mask(**versioned(kwargs))


def config(family, **overrides):
    if family == "gpt2":
        fields = dict(n_layer=LAYERS, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2Config(**{**fields, **overrides})
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    # initializer_range 0.2: peaked attention, so a key too many or too few changes the logits
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2)
    if family == "mistral":
        fields["sliding_window"] = 5
    if family == "qwen2":  # layer 0 full attention, layer 1 a sliding window of 4
        fields.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return cls(**{**fields, **overrides})


def model(family, implementation, **overrides):
    hf.register()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config(family, **overrides), attn_implementation=implementation).float()


@pytest.fixture
def attention_calls(monkeypatch):
    """The window_left and whether document ids were passed, per call of functional.attention."""
    calls = []
    original = functional.attention

    def counting(q, k, v, scale=None, **kwargs):
        calls.append((kwargs.get("window_left", -1), kwargs.get("document_ids") is not None))
        return original(q, k, v, scale, **kwargs)

    monkeypatch.setattr(functional, "attention", counting)
    return calls


@pytest.fixture
def fallbacks(monkeypatch, caplog):
    """The SDPA-fallback log lines, with the once-only memory cleared."""
    monkeypatch.setattr(hf, "_LOGGED", set())
    caplog.set_level(logging.WARNING, logger="gptfast")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "gptfast"]


def logits_and_grads(net, ids, weights, **inputs):
    net.zero_grad(set_to_none=True)
    logits = net(ids, **inputs).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def assert_same(ours, theirs):
    """Logits and every gradient equal up to fp32 rounding at the scale of each tensor."""
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    assert ours[1].keys() == theirs[1].keys()
    for name, grad in ours[1].items():
        expected = theirs[1][name]
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, expected, atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


WINDOWS = {"llama": [-1, -1], "mistral": [4, 4], "qwen2": [-1, 3], "gpt2": [-1, -1]}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_tiny_models_give_eager_logits_and_gradients(family, backend, attention_calls, fallbacks):
    ours, eager = model(family, "gptfast"), model(family, "eager")
    assert ours.config._attn_implementation == "gptfast"
    ids = torch.randint(0, VOCAB, (2, 19))
    weights = torch.randn(2, 19, VOCAB)
    with gptfast.use_backend(backend):
        got = logits_and_grads(ours, ids, weights)
    assert [window for window, _ in attention_calls] == WINDOWS[family]
    assert fallbacks() == []
    assert_same(got, logits_and_grads(eager, ids, weights))


@pytest.mark.parametrize("window", [1, 2, 5, 11, 12, 15])
def test_hf_sliding_window_is_window_left_minus_one_at_the_boundary(window):
    """HF's window w (masking_utils: i - w < j <= i) against SDPA with HF's own mask, T=12."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    hf_mask = sdpa_mask(batch_size=1, q_length=12, kv_length=12, allow_is_causal_skip=False,
                        mask_function=sliding_window_causal_mask_function(window))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=hf_mask)
    for backend in ("reference", "triton"):
        with gptfast.use_backend(backend):
            out, _ = hf.attention_forward(module, q, k, v, None, sliding_window=window)
        torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family,use_cache", [("llama", False), ("mistral", True)])
def test_packed_sequences_run_as_documents(family, use_cache, backend, attention_calls, fallbacks,
                                           monkeypatch):
    """position_ids restarting at 0 (batch 1): each document as if run alone through eager.
    Without a cache HF builds the packed 4-D mask, which must be found equal to the documents
    mask; with one (the default) HF builds none and the documents come from position_ids."""
    checked = []
    original = hf._is_our_mask
    monkeypatch.setattr(hf, "_is_our_mask", lambda *a: checked.append(original(*a)) or checked[-1])
    ours, eager = model(family, "gptfast"), model(family, "eager")
    lengths = [7, 1, 9]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.randn(1, sum(lengths), VOCAB)
    with gptfast.use_backend(backend):
        got = logits_and_grads(ours, ids, weights, position_ids=positions, use_cache=use_cache)
    assert attention_calls == [(4 if family == "mistral" else -1, True)] * LAYERS
    assert checked == ([] if use_cache else [True] * LAYERS)
    assert fallbacks() == []

    eager.zero_grad(set_to_none=True)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    logits = torch.cat([eager(ids[:, a:b]).logits for a, b in zip(bounds, bounds[1:])], dim=1)
    (logits * weights).sum().backward()
    expected = (logits.detach(), {n: p.grad.clone() for n, p in eager.named_parameters()})
    assert_same(got, expected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fa_varlen_boundaries_run_as_documents(backend, attention_calls, fallbacks):
    """cu_seq_lens_q/k (HF's DataCollatorWithFlattening(return_flash_attn_kwargs=True)) mark
    the documents, as for FA2; boundaries that differ between q and k fall back."""
    ours, eager = model("llama", "gptfast"), model("llama", "eager")
    lengths = [5, 3, 8]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    with gptfast.use_backend(backend):
        got = ours(ids, position_ids=positions, use_cache=False, **varlen).logits
    assert attention_calls == [(-1, True)] * LAYERS and fallbacks() == []
    expected = torch.cat([eager(ids[:, a:b]).logits for a, b in ((0, 5), (5, 8), (8, 16))], 1)
    torch.testing.assert_close(got, expected, **TOL)

    module = torch.nn.Module()
    q = torch.randn(1, 2, 16, 8)
    other = torch.tensor([0, 4, 8, 16], dtype=torch.int32)
    out, _ = hf.attention_forward(module, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=other)
    assert len(attention_calls) == LAYERS and "cu_seq_lens" in fallbacks()[-1]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, sdpa.transpose(1, 2))


@pytest.mark.parametrize("use_cache", [True, False])
def test_compiles_without_graph_breaks(use_cache):
    """torch.compile(fullgraph=True) traces the attention function: position_ids become
    document ids without reading their values; a 4-D mask (HF builds one for every call under
    compile without a cache) cannot be checked there and runs SDPA, without a log line."""
    ours, eager = model("mistral", "gptfast"), model("mistral", "eager")
    ids = torch.randint(0, VOCAB, (2, 13))
    compiled = torch.compile(lambda i: ours(i, use_cache=use_cache).logits, backend="eager",
                             fullgraph=True)
    with gptfast.use_backend("reference"):
        torch.testing.assert_close(compiled(ids), eager(ids).logits, **TOL)


def test_padding_falls_back_to_sdpa_and_logs_once(attention_calls, fallbacks):
    ours, eager = model("llama", "gptfast"), model("llama", "eager")
    ids = torch.randint(0, VOCAB, (2, 16))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    for _ in range(2):
        got = ours(ids, attention_mask=padding).logits
    assert attention_calls == []
    (line,) = fallbacks()
    assert "padding" in line and "SDPA" in line
    expected = eager(ids, attention_mask=padding).logits
    kept = padding.bool()
    torch.testing.assert_close(got[kept], expected[kept], **TOL)


def test_dropout_fallback_keeps_the_window(attention_calls, fallbacks):
    """In training with attention dropout, SDPA runs with the sliding-window mask spelled out:
    the same draws as attn_implementation='sdpa' (which gets HF's mask)."""
    ours = model("mistral", "gptfast", attention_dropout=0.3).train()
    sdpa = model("mistral", "sdpa", attention_dropout=0.3).train()
    ids = torch.randint(0, VOCAB, (1, 16))
    torch.manual_seed(1)
    got = ours(ids).logits
    torch.manual_seed(1)
    expected = sdpa(ids).logits
    assert attention_calls == []
    assert any("dropout" in line for line in fallbacks())
    torch.testing.assert_close(got, expected, **TOL)


def test_generation_matches_eager(attention_calls):
    ours, eager = model("qwen2", "gptfast"), model("qwen2", "eager")
    prompt = torch.randint(0, VOCAB, (1, 9))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))
    assert len(attention_calls) == LAYERS  # the prefill; each decoding step runs SDPA


def test_patch_switches_a_hf_model_and_says_so():
    net = model("llama", "sdpa")
    eager = model("llama", "eager")
    _, report = gptfast.patch(net, return_report=True)
    names = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert report.names("HF attention") == names
    assert net.config._attn_implementation == "gptfast"
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(net(ids).logits, eager(ids).logits, **TOL)
    _, again = gptfast.patch(net, return_report=True)
    assert again.names("HF attention") == [] and again.already == names
    _, skipped = gptfast.patch(eager, return_report=True)
    assert "attn_implementation='eager'" in skipped.skipped["model.layers.0.self_attn"]
    assert eager.config._attn_implementation == "eager"

    class NoFlash(transformers.LlamaForCausalLM):
        _supports_flash_attn = False

    no_flash = NoFlash(config("llama"))
    _, skipped = gptfast.patch(no_flash, return_report=True)
    assert "does not support flash attention" in skipped.skipped["model.layers.1.self_attn"]
    assert no_flash.config._attn_implementation == "sdpa"


def test_mask_builder_leaves_only_what_it_computes_to_us():
    """No mask for plain causal and the config's sliding window; SDPA's mask for the rest."""
    hf.register()
    causal = transformers.masking_utils.causal_mask_function
    plain = dict(batch_size=2, q_length=6, kv_length=6, mask_function=causal)
    assert hf.build_mask(**versioned(plain)) is None
    ones = torch.ones(2, 6, dtype=torch.bool)
    assert hf.build_mask(**versioned(plain), attention_mask=ones) is None
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[0, 0] = False
    for changed in (dict(attention_mask=padded), dict(allow_is_causal_skip=False),
                    dict(q_length=1, kv_length=7, q_offset=6),
                    dict(q_length=3, kv_length=9, q_offset=6, attention_mask=padded.repeat(1, 2)[:, :9])):
        kwargs = {**plain, **changed}
        mask, expected = hf.build_mask(**versioned(kwargs)), sdpa_mask(**kwargs)
        assert (mask is None) == (expected is None) and (mask is None or torch.equal(mask, expected))
        assert mask is not None or changed.get("q_length") == 1, changed
    window = dict(plain, mask_function=sliding_window_causal_mask_function(3), local_size=3)
    assert sdpa_mask(**window) is not None
    assert hf.build_mask(**versioned(window), config=config("mistral", sliding_window=3)) is None
    assert hf.build_mask(**versioned(window), config=config("mistral", sliding_window=4)) is not None
    chunked = config("mistral", sliding_window=3)
    chunked.attention_chunk_size = 3  # Llama 4's chunked attention: not a sliding window
    assert torch.equal(hf.build_mask(**versioned(window), config=chunked), sdpa_mask(**window))


def test_refused_arguments_and_bad_windows():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="softcap"):
        hf.attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="sliding_window"):
        hf.attention_forward(module, q, q, q, None, sliding_window=0)


def test_info_says_whether_registration_is_available():
    assert hf.availability().startswith(f"available with transformers {transformers.__version__}")
    from gptfast import cli

    assert cli.collect_info()["hf_attention"] == hf.availability()
