"""gptfast.patch on other people's models: nanoGPT-style attention and Hugging Face GPT-2."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gptfast
from gptfast import functional
from gptfast.nn import PatchReport, patch

TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- nanoGPT's modules --

class NanoCausalSelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, verbatim up to the config object."""

    def __init__(self, n_embd, n_head, block_size=16, dropout=0.0, flash=True, causal=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.flash = flash
        self.causal = causal  # False: a look-alike that patch must refuse
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                                 .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0,
                                               is_causal=self.causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoBlock(nn.Module):
    def __init__(self, n_embd=32, n_head=4, **attention):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = NanoCausalSelfAttention(n_embd, n_head, **attention)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts calls of gptfast.causal_attention, to tell the fast path from a fallback."""
    calls = []
    original = functional.causal_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "causal_attention", counting)
    return calls


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_attention_runs_on_gptfast_with_the_same_outputs_and_gradients(flash, attention_calls):
    model = nn.Sequential(NanoBlock(flash=flash), NanoBlock(flash=flash))
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())

    _, report = patch(model, return_report=True)

    assert report.names("nanoGPT attention") == ["0.attn", "1.attn"]
    assert report.names("LayerNorm") == ["0.ln_1", "0.ln_2", "1.ln_1", "1.ln_2"]
    assert report.skipped == {}
    assert isinstance(model[0].attn, NanoCausalSelfAttention)
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys
    x = torch.randn(3, 9, 32)
    attention_calls.clear()
    out, expected = model(x), reference(x)
    assert len(attention_calls) == 2
    torch.testing.assert_close(out, expected, **TOL)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_nanogpt_attention_dropout_matches_the_flash_path_in_training(attention_calls):
    block = NanoBlock(dropout=0.2).train()
    reference = copy.deepcopy(block)
    patch(block)
    attention_calls.clear()  # patch's own check of the new forward
    x = torch.randn(2, 8, 32)
    torch.manual_seed(5)
    expected = reference(x)
    torch.manual_seed(5)
    out = block(x)
    assert attention_calls == []  # SDPA applies the dropout, as nanoGPT's flash path
    torch.testing.assert_close(out, expected, **TOL)
    block.eval()
    block(x)
    assert len(attention_calls) == 1


def test_lookalike_attention_with_other_math_is_left_alone(attention_calls):
    block = NanoBlock(causal=False)
    original_class = type(block.attn)
    _, report = patch(block, return_report=True)
    assert "differs from nanoGPT's causal attention" in report.skipped["attn"]
    assert type(block.attn) is original_class
    assert report.names("LayerNorm") == ["ln_1", "ln_2"]
    attention_calls.clear()
    block(torch.randn(1, 4, 32))
    assert attention_calls == []


def test_lookalike_with_wrong_projection_shapes_is_reported():
    module = NanoCausalSelfAttention(32, 4)
    module.c_attn = nn.Linear(32, 64)
    _, report = patch(nn.Sequential(module), return_report=True)
    assert "c_attn is not a Linear(32, 96)" in report.skipped["0"]


def test_patched_attention_survives_deepcopy_pickle_and_a_second_patch(attention_calls):
    model = nn.Sequential(NanoBlock())
    patch(model)
    x = torch.randn(2, 5, 32)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        attention_calls.clear()
        torch.testing.assert_close(clone(x), expected, **TOL)
        assert len(attention_calls) == 1
        assert isinstance(clone[0].attn, NanoCausalSelfAttention)
    _, again = patch(model, return_report=True)
    assert again.replaced == [] and again.skipped == {}
    assert "0 LayerNorm(s) and 0 attention module(s)" in str(again)


def test_gptfast_modules_and_opt_outs_are_respected():
    model = nn.Sequential(gptfast.nn.CausalSelfAttention(32, 4), NanoBlock())
    _, report = patch(model, return_report=True, attention=False)
    assert report.names("nanoGPT attention") == [] and len(report.names("LayerNorm")) == 2
    _, report = patch(model, return_report=True, layer_norm=False)
    assert report.replaced == ["1.attn"]  # gptfast's own attention is not touched


# ------------------------------------------------------------ LayerNorm-like modules --

class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm, verbatim: "LayerNorm but with an optional bias"."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class WideEpsNorm(NanoLayerNorm):
    """Claims eps 1e-5 but normalises with 1e-2: the probe must notice."""

    eps = 1e-5

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-2)


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_layer_norms_move_to_gptfast_with_the_same_outputs_and_gradients(bias, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(NanoLayerNorm(32, bias), nn.Linear(32, 32), NanoLayerNorm(32, bias))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    reference = copy.deepcopy(model)
    keys, params = list(model.state_dict()), list(model.parameters())
    calls = []
    real = functional.layer_norm
    monkeypatch.setattr(functional, "layer_norm", lambda *a: calls.append(a[3]) or real(*a))

    _, report = patch(model, return_report=True)

    assert report.names("LayerNorm") == ["0", "2"] and report.skipped == {}
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    x = torch.randn(3, 5, 32, requires_grad=True)
    out = model(x)
    assert calls == [1e-5, 1e-5], "both norms run gptfast.layer_norm with nanoGPT's eps"
    expected = reference(x)
    torch.testing.assert_close(out, expected, **TOL)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *reference.parameters()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(copy.deepcopy(restored)(x), expected, **TOL)


def test_norms_that_compute_something_else_are_reported_and_left_alone():
    model = nn.Sequential(RMSNorm(16), WideEpsNorm(16, True), nn.Linear(16, 16))
    _, report = patch(model, return_report=True)
    assert report.replaced == []
    assert "not F.layer_norm" in report.skipped["0"]
    assert "eps=1e-05" in report.skipped["1"]
    assert type(model[0]) is RMSNorm and type(model[1]) is WideEpsNorm
    assert "2" not in report.skipped, "a Linear is not a norm: nothing to report"


def test_a_second_patch_reports_what_already_runs_on_gptfast():
    torch.manual_seed(0)
    model = nn.Sequential(NanoBlock(), gptfast.nn.CausalSelfAttention(32, 4), NanoLayerNorm(32, False))
    _, first = patch(model, return_report=True)
    assert len(first.replaced) == 4 and first.already == ["1"]
    _, second = patch(model, return_report=True)
    assert second.replaced == [] and second.skipped == {}
    assert second.already == ["0.ln_1", "0.attn", "0.ln_2", "1", "2"]
    assert "0 attention module(s) now run on gptfast, 5 already did" in str(second)


# ---------------------------------------------------------------- Hugging Face GPT-2 --

def hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    fields = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2Config(**{**fields, **overrides})


def hf_model(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(hf_config(**overrides)).eval()


def test_patched_hf_gpt2_gives_the_same_logits_through_gptfast(attention_calls):
    model = hf_model()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    idx = torch.randint(0, 101, (2, 24))
    with gptfast.use_backend("reference"):
        _, report = patch(model, return_report=True)
        assert report.names("GPT2Attention") == ["transformer.h.0.attn", "transformer.h.1.attn"]
        assert len(report.names("LayerNorm")) == 5 and report.skipped == {}
        assert model.config._attn_implementation == "gptfast"
        assert list(model.state_dict()) == keys
        attention_calls.clear()
        logits = model(idx).logits
        assert len(attention_calls) == 2
        torch.testing.assert_close(logits, reference(idx).logits, **TOL)


def test_patched_hf_gpt2_falls_back_for_padding_and_cached_generation(attention_calls):
    model = hf_model()
    reference = copy.deepcopy(model)
    patch(model)
    idx = torch.randint(1, 101, (2, 12))
    padding = torch.ones_like(idx)
    padding[0, :5] = 0  # left padding: a mask that is not purely causal
    attention_calls.clear()
    out = model(idx, attention_mask=padding).logits
    assert attention_calls == []
    torch.testing.assert_close(out, reference(idx, attention_mask=padding).logits, **TOL)

    prompt = torch.randint(1, 101, (1, 6))
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert len(attention_calls) == 2  # the prefill only; each cached decoding step falls back
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=6, do_sample=False))


def test_patched_hf_gpt2_trains(attention_calls):
    model = hf_model().train()
    patch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 101, (4, 16))
    losses = []
    for _ in range(6):
        loss = model(idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert len(attention_calls) == 12
    assert losses[-1] < losses[0] - 0.1


def test_hf_cross_attention_and_other_implementations_are_skipped():
    transformers = pytest.importorskip("transformers")
    model = hf_model(add_cross_attention=True)
    _, report = patch(model, return_report=True)
    assert report.names("GPT2Attention") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert "cross-attention" in report.skipped["transformer.h.0.crossattention"]
    encoder = torch.randn(1, 5, 64)
    idx = torch.randint(0, 101, (1, 7))
    assert model(idx, encoder_hidden_states=encoder).logits.shape == (1, 7, 101)

    eager = transformers.GPT2LMHeadModel(hf_config(attn_implementation="eager"))
    _, report = patch(eager, return_report=True)
    assert report.names("GPT2Attention") == []
    assert "attn_implementation='eager'" in report.skipped["transformer.h.0.attn"]
    assert isinstance(report, PatchReport) and "skipped transformer.h.1.attn" in str(report)
