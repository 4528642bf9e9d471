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
    """Counts calls of gptfast.causal_attention and functional.attention (which HF models'
    attn_implementation "gptfast" runs), to tell the fast path from a fallback."""
    calls = []

    def counting(original):
        def count(*args, **kwargs):
            calls.append(args[0].shape)
            return original(*args, **kwargs)
        return count

    for name in ("causal_attention", "attention"):
        monkeypatch.setattr(functional, name, counting(getattr(functional, name)))
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


# ------------------------------------------------ masks: windows and anything else --

def band(block_size, window):
    """nanoGPT's tril buffer cut to a sliding window: i - window < j <= i."""
    i = torch.arange(block_size)
    return ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)).float()


def prefix_lm(block_size, prefix):
    mask = torch.tril(torch.ones(block_size, block_size))
    mask[:prefix, :prefix] = 1
    return mask


def random_mask(block_size):
    generator = torch.Generator().manual_seed(3)
    mask = (torch.rand(block_size, block_size, generator=generator) < 0.6).float().tril()
    return mask.fill_diagonal_(1)


class BufferMaskAttention(NanoCausalSelfAttention):
    """nanoGPT's non-flash path with ``mask`` in its ``bias`` buffer instead of the tril."""

    def __init__(self, mask, n_embd=32, n_head=4, **kwargs):
        super().__init__(n_embd, n_head, block_size=mask.shape[-1], flash=False, **kwargs)
        self.bias.copy_(mask)


class SdpaWindowAttention(NanoCausalSelfAttention):
    """The flash path with a window as an attn_mask built in forward; no buffer, no block size."""

    def __init__(self, window, n_embd=32, n_head=4):
        super().__init__(n_embd, n_head)
        self.window = window

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        visible = band(T, self.window).bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def assert_same_outputs_and_gradients(module, reference, x):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = module(x1), reference(x2)
    torch.testing.assert_close(out, expected, **TOL)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


@pytest.fixture
def attention_windows(monkeypatch):
    """The window of each gptfast.causal_attention call."""
    windows = []
    original = functional.causal_attention

    def recording(*args, **kwargs):
        windows.append(kwargs.get("window"))
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "causal_attention", recording)
    return windows


@pytest.mark.parametrize("window", [1, 7, 8, 32])
@pytest.mark.parametrize("block_size", [40, 64])
def test_a_sliding_window_in_the_bias_buffer_runs_as_that_window(window, block_size, attention_windows):
    module = BufferMaskAttention(band(block_size, window))
    reference = copy.deepcopy(module)
    _, report = patch(nn.Sequential(module), return_report=True)
    for seq in (block_size, block_size - 3, 5):
        attention_windows.clear()
        assert_same_outputs_and_gradients(module, reference, torch.randn(2, seq, 32))
        assert attention_windows == [window]
    assert report.names("nanoGPT attention") == ["0"], report.skipped
    assert report.checked["0"].startswith(f"sliding window {window}, checked up to {block_size} tokens")


def test_a_window_as_long_as_the_block_is_plain_causal_and_longer_inputs_run_the_module(attention_windows):
    module = SdpaWindowAttention(window=20)
    reference = copy.deepcopy(module)
    model = nn.Sequential(module)
    model.config = type("Config", (), {"block_size": 16})()  # nanoGPT's GPT keeps it here
    _, report = patch(model, return_report=True)
    attention_windows.clear()
    assert_same_outputs_and_gradients(module, reference, torch.randn(2, 16, 32))
    assert attention_windows == [None]
    attention_windows.clear()  # past the block the window shows: the module's own forward runs
    assert_same_outputs_and_gradients(module, reference, torch.randn(2, 24, 32))
    assert attention_windows == []
    assert report.checked["0"].startswith("causal, checked up to 16 tokens")


@pytest.mark.parametrize("window", [1, 7, 8, 32])
def test_a_window_built_in_forward_is_found_without_a_block_size(window, attention_windows):
    module = SdpaWindowAttention(window)
    reference = copy.deepcopy(module)
    _, report = patch(nn.Sequential(module), return_report=True)
    attention_windows.clear()
    assert_same_outputs_and_gradients(module, reference, torch.randn(1, 45, 32))
    assert attention_windows == [window]
    assert report.checked["0"].startswith(f"sliding window {window}, checked up to 1024 tokens")


def one_key_hidden(block_size, row, key):
    mask = torch.tril(torch.ones(block_size, block_size))
    mask[row, key] = 0
    return mask


@pytest.mark.parametrize("mask,why", [
    (prefix_lm(48, 6), "differs from nanoGPT's causal attention on a probe of 48 tokens"),
    (random_mask(48), "neither causal nor a sliding window"),
    (torch.ones(48, 48), "differs from nanoGPT's causal attention"),  # bidirectional
    (one_key_hidden(48, 40, 30), "differs from nanoGPT's causal attention"),  # beyond 7 tokens
    (band(48, 8) * one_key_hidden(48, 44, 40), "with a sliding window of 8"),
], ids=["prefix_lm", "random", "bidirectional", "one_key_hidden", "window_with_a_hole"])
def test_any_other_mask_is_left_alone(mask, why, attention_calls):
    module = BufferMaskAttention(mask)
    reference = copy.deepcopy(module)
    _, report = patch(nn.Sequential(module), return_report=True)
    assert report.replaced == [] and why in report.skipped["0"], report.skipped
    assert type(module) is BufferMaskAttention
    attention_calls.clear()
    assert_same_outputs_and_gradients(module, reference, torch.randn(2, 48, 32))
    assert attention_calls == []


# ------------------------------------------------------------ dropout under any name --

class RenamedDropoutAttention(NanoCausalSelfAttention):
    """nanoGPT's non-flash attention with timm's dropout names: attn_drop on the attention
    probabilities, proj_drop after c_proj; ``misplaced`` drops q instead."""

    def __init__(self, p=0.5, misplaced=False, n_embd=32, n_head=4, block_size=16):
        super().__init__(n_embd, n_head, block_size=block_size, flash=False)
        del self.attn_dropout, self.resid_dropout
        self.dropout = 0.0
        self.attn_drop = nn.Dropout(p)
        self.proj_drop = nn.Dropout(p)
        self.misplaced = misplaced

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        if self.misplaced:
            q = self.attn_drop(q)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        if not self.misplaced:
            att = self.attn_drop(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj_drop(self.c_proj(y))


class FunctionalDropoutAttention(NanoCausalSelfAttention):
    """The flash path with both probabilities in number attributes of other names."""

    def __init__(self, attn_p=0.5, resid_p=0.5, n_embd=32, n_head=4):
        super().__init__(n_embd, n_head)
        del self.attn_dropout, self.resid_dropout
        self.dropout = 0.0
        self.attention_p, self.residual_p = attn_p, resid_p

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attention_p if self.training else 0.0)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return F.dropout(y, self.residual_p, self.training)


def spread(module, x, calls=20, output=lambda out: out):
    """How much the outputs of repeated training-mode calls differ (0: no dropout applied)."""
    module.train()
    outputs = torch.stack([output(module(x)).detach() for _ in range(calls)])
    return outputs.std(0).mean().item()


@pytest.mark.parametrize("make", [
    lambda: RenamedDropoutAttention(), lambda: FunctionalDropoutAttention(),
    lambda: FunctionalDropoutAttention(attn_p=0.0), lambda: FunctionalDropoutAttention(resid_p=0.0),
    lambda: NanoCausalSelfAttention(32, 4, dropout=0.5, flash=False),
    lambda: NanoCausalSelfAttention(32, 4, dropout=0.5, flash=True),
], ids=["attn_drop-proj_drop", "functional", "functional-residual-only",
        "functional-attention-only", "nanogpt-materialised", "nanogpt-flash"])
def test_dropout_under_any_name_is_kept(make):
    module = make()
    reference = copy.deepcopy(module)
    _, report = patch(nn.Sequential(module), return_report=True)
    assert report.names("nanoGPT attention") == ["0"], report.skipped
    x = torch.randn(2, 12, 32)
    before, after = spread(reference, x), spread(module, x)
    assert before > 0.05 and 0.7 < after / before < 1.4, (before, after)
    reference.eval(), module.eval()
    assert_same_outputs_and_gradients(module, reference, x)


def test_dropout_probabilities_changed_after_patch_still_apply():
    module = RenamedDropoutAttention(p=0.0)
    functional_module = FunctionalDropoutAttention(attn_p=0.0, resid_p=0.0)
    patch(nn.Sequential(module, functional_module))
    x = torch.randn(2, 12, 32)
    assert spread(module, x) == 0.0 and spread(functional_module, x) == 0.0
    module.attn_drop.p = module.proj_drop.p = 0.5
    functional_module.attention_p = functional_module.residual_p = 0.5
    assert spread(module, x) > 0.05 and spread(functional_module, x) > 0.05


class DroppedInputAttention(NanoCausalSelfAttention):
    def __init__(self):
        super().__init__(32, 4)
        self.input_drop = nn.Dropout(0.5)

    def forward(self, x):
        return super().forward(self.input_drop(x))


class LiteralDropoutAttention(FunctionalDropoutAttention):
    def forward(self, x):  # p=0.1 written into the call: nothing gptfast could keep in sync
        return F.dropout(super().forward(x), 0.1, self.training)


@pytest.mark.parametrize("make,why", [
    (lambda: RenamedDropoutAttention(misplaced=True), "dropout(p=0.5, from attn_drop) drops a tensor"),
    (DroppedInputAttention, "dropout(p=0.5, from input_drop) drops a tensor"),
    (LiteralDropoutAttention, "dropout(p=0.5) drops a tensor"),  # its output is dropped again
    (lambda: RenamedDropoutAttention(misplaced=True, p=0.0), "from attn_drop) drops a tensor"),
], ids=["on_q", "on_the_input", "twice_after_c_proj", "misplaced_even_at_p0"])
def test_dropout_gptfast_cannot_keep_leaves_the_module_alone(make, why):
    module = make()
    _, report = patch(nn.Sequential(module), return_report=True)
    assert report.replaced == [] and why in report.skipped["0"], report.skipped
    assert type(module) is type(make())
    assert spread(module, torch.randn(2, 12, 32)) > 0.05 or "p0" in why or "p=0" in report.skipped["0"]


def test_an_untraceable_dropout_probability_leaves_the_module_alone():
    class Untraced(FunctionalDropoutAttention):
        def forward(self, x):
            y = super().forward(x)
            return y + 0 * F.dropout(y, 0.25, self.training)  # drops a copy, not c_proj's output

    _, report = patch(nn.Sequential(Untraced()), return_report=True)
    assert "neither the attention probabilities nor c_proj's returned output" in report.skipped["0"]


def test_dropout_in_the_block_is_untouched():
    class Block(NanoBlock):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            x = x + self.drop(self.attn(self.ln_1(x)))
            return x + self.drop(self.mlp(self.ln_2(x)))

    block = Block()
    reference = copy.deepcopy(block)
    _, report = patch(block, return_report=True)
    assert report.names("nanoGPT attention") == ["attn"]
    x = torch.randn(2, 12, 32)
    before, after = spread(reference, x), spread(block, x)
    assert before > 0.05 and 0.7 < after / before < 1.4, (before, after)
    reference.eval(), block.eval()
    assert_same_outputs_and_gradients(block, reference, x)


# ----------------------------------------------------- Hugging Face GPT-2: masks, dropout --

def test_hf_gpt2_keeps_its_own_masks_and_its_dropout(attention_calls):
    """HF GPT-2's mask comes from masking_utils (causal + padding; GPT-2 has no window); a
    4-D mask passed in (a window, a prefix LM) falls back to HF's SDPA unchanged."""
    model = hf_model(n_positions=48)
    reference = copy.deepcopy(model)
    patch(model)
    idx = torch.randint(1, 101, (2, 40))
    for mask in (band(40, 8), prefix_lm(40, 10), random_mask(40)):
        additive = torch.zeros(40, 40).masked_fill(mask == 0, torch.finfo(torch.float32).min)
        additive = additive[None, None].expand(2, 1, 40, 40)
        attention_calls.clear()
        out = model(idx, attention_mask=additive).logits
        assert attention_calls == []
        torch.testing.assert_close(out, reference(idx, attention_mask=additive).logits, **TOL)

    model, reference = hf_model(attn_pdrop=0.5, resid_pdrop=0.5), hf_model(attn_pdrop=0.5, resid_pdrop=0.5)
    patch(model)
    before, after = (spread(m, idx[:1, :12], output=lambda out: out.logits) for m in (reference, model))
    assert before > 0.05 and 0.7 < after / before < 1.4, (before, after)


class ProbabilityFrom(FunctionalDropoutAttention):
    """SDPA's dropout_p from ``how``: a literal, two attributes at once, or two SDPA calls."""

    def __init__(self, how):
        super().__init__(resid_p=0.0)
        self.how, self.first_p, self.second_p = how, 0.5, 0.5

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        p = {"literal": 0.1, "product": self.first_p * self.second_p / 0.5,
             "twice": self.attention_p}[self.how] if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        if self.how == "twice":
            y = (y + F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)) / 2
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


@pytest.mark.parametrize("how,why", [
    ("literal", "cannot tell which attribute its probability comes from"),
    ("product", "follows several attributes (first_p, second_p)"),
    ("twice", "more than one attention or residual dropout"),
])
def test_a_dropout_probability_gptfast_cannot_follow_leaves_the_module_alone(how, why):
    module = ProbabilityFrom(how)
    _, report = patch(nn.Sequential(module), return_report=True)
    assert report.replaced == [] and why in report.skipped["0"], report.skipped
    assert spread(module, torch.randn(2, 12, 32)) > 0.02
