"""gptfast.patch on a model of nanochat's structure (karpathy/nanochat, nanochat/gpt.py).

nanochat is not on PyPI and its code is not copied here: TinyChat below is this test's own
small model with the same structure and conventions, which is what patch() recognises and
probes: a module-level ``norm`` (parameter-free F.rms_norm), ``apply_rotary_emb`` rotating by
-theta, a module-level ``flash_attn`` namespace (here an SDPA version of flash-attention's
``flash_attn_func`` / ``flash_attn_with_kvcache`` with FA's (left, right) windows), Linear
layers that cast their weight to the input's dtype, GQA, value embeddings with a gate,
per-layer windows "SSSL", smear, backout, resid/x0 lambdas, a vocab padded for lm_head and
sliced back, fp32 logits softcapped at 15, and cross-entropy with ignore_index -1 and
``loss_reduction``.
"""

import copy
import types
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gptfast
from gptfast.patching import nanochat as nanochat_patch


# ------------------------------------------------------------- the model's module level --

def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """Rotation by -theta of the pairs (x[i], x[i + D/2]), x (B, T, H, D), cos/sin (1, T, 1, D/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos + second * sin, second * cos - first * sin], dim=-1)


def _visible(seq_q, seq_k, left):
    """flash-attention's causal mask with window (left, 0): query i (at position seq_k - seq_q + i)
    sees key j when position - left <= j <= position; left -1 is unlimited."""
    position = torch.arange(seq_q)[:, None] + (seq_k - seq_q)
    key = torch.arange(seq_k)[None, :]
    visible = key <= position
    return visible if left < 0 else visible & (key >= position - left)


def _sdpa_flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    assert causal and window_size[1] == 0
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = _visible(q.shape[2], k.shape[2], window_size[0]).to(q.device)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return y.transpose(1, 2)


def _sdpa_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                                  causal=False, window_size=(-1, -1)):
    start = int(cache_seqlens[0])
    end = start + q.shape[1]
    k_cache[:, start:end], v_cache[:, start:end] = k, v
    return _sdpa_flash_attn_func(q, k_cache[:, :end], v_cache[:, :end], causal, window_size)


flash_attn = types.SimpleNamespace(flash_attn_func=_sdpa_flash_attn_func,
                                   flash_attn_with_kvcache=_sdpa_flash_attn_with_kvcache)


# ------------------------------------------------------------------------- the model --

@dataclass
class TinyConfig:
    sequence_len: int = 16
    vocab_size: int = 50
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 32
    window_pattern: str = "SSSL"


class Linear(nn.Linear):
    """Bias-free Linear computing in its input's dtype (fp32 master weights)."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def gets_value_embedding(layer, n_layer):
    return layer % 2 == (n_layer - 1) % 2


class TinyAttention(nn.Module):
    qk_gain = 1.2

    def __init__(self, config, layer):
        super().__init__()
        self.layer_idx = layer
        self.n_head, self.n_kv_head, self.n_embd = config.n_head, config.n_kv_head, config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_embd, self.n_embd)
        self.ve_gate = Linear(12, self.n_kv_head) if gets_value_embedding(layer, config.n_layer) else None

    def sharpen(self, q, k):
        return q * self.qk_gain, k * self.qk_gain

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        batch, seq, _ = x.shape
        q = self.c_q(x).view(batch, seq, self.n_head, self.head_dim)
        k = self.c_k(x).view(batch, seq, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(batch, seq, self.n_kv_head, self.head_dim)
        if ve is not None:
            weight = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))
            v = v + weight[..., None] * ve.view(batch, seq, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k = self.sharpen(q, k)
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.layer(self.layer_idx)
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                   cache_seqlens=kv_cache.cache_seqlens,
                                                   causal=True, window_size=window_size)
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.cache_seqlens += seq
        return self.c_proj(y.reshape(batch, seq, -1))


class TinyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class TinyBlock(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = TinyAttention(config, layer)
        self.mlp = TinyMLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


class TinyChat(nn.Module):
    attention = TinyAttention
    softcap = 15

    def __init__(self, config, pad_to=64):
        super().__init__()
        self.config = config
        padded = -(-config.vocab_size // pad_to) * pad_to
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded, config.n_embd),
            "h": nn.ModuleList([TinyBlock(config, i) for i in range(config.n_layer)]),
        })
        for block in self.transformer.h:
            block.attn.__class__ = self.attention
        self.lm_head = Linear(config.n_embd, padded)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded, kv_dim)
                                           for i in range(config.n_layer)
                                           if gets_value_embedding(i, config.n_layer)})
        self.resid_lambdas = nn.Parameter(torch.linspace(1.15, 1.05, config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.linspace(0.2, 0.05, config.n_layer))
        self.smear_gate = Linear(24, 1)
        self.smear_lambda = nn.Parameter(torch.full((1,), 0.3))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        long = config.sequence_len
        short = max(1, long // 4)
        self.window_sizes = [((short if config.window_pattern[i % len(config.window_pattern)] == "S"
                               else long), 0) for i in range(config.n_layer)]
        self.window_sizes[-1] = (long, 0)
        half = config.n_embd // config.n_head // 2
        # in fp64, then cast with the model: rotate-then-norm (the model) equals norm-then-rotate
        # (gptfast) where cos^2 + sin^2 = 1 holds to the model's precision
        angles = torch.outer(torch.arange(4 * long, dtype=torch.float64),
                             10000.0 ** (-torch.arange(half, dtype=torch.float64) / half))
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        with torch.no_grad():  # large enough logits for the softcap to matter
            self.lm_head.weight.normal_(0, 2.0)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        batch, seq = idx.shape
        start = 0 if kv_cache is None else int(kv_cache.cache_seqlens[0])
        cos_sin = self.cos[:, start:start + seq], self.sin[:, start:start + seq]
        x = norm(self.transformer.wte(idx))
        if kv_cache is None or seq > 1:  # smear: each token takes a gated share of the previous one
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, kept = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == self.config.n_layer // 2:
                kept = x
        x = norm(x - self.backout_lambda.to(x.dtype) * kept)
        softcap = self.softcap
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = self.cap(logits, softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)

    @staticmethod
    def cap(logits, softcap):
        return softcap * torch.tanh(logits / softcap)


class TinyCache:
    """The KV cache the attention's flash_attn_with_kvcache call reads: (B, T_max, Hkv, D) per layer."""

    def __init__(self, config, batch, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (batch, config.sequence_len, config.n_kv_head, head_dim)
        self.n_layers = config.n_layer
        self.caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                       for _ in range(config.n_layer)]
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32)

    def layer(self, i):
        return self.caches[i]


# ----------------------------------------------------------------------------- helpers --

def tiny_chat(cls=TinyChat, dtype=torch.float64, **config):
    torch.manual_seed(0)
    return cls(TinyConfig(**config)).to(dtype)


def batch(config, rows=2, seq=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    seq = seq or config.sequence_len
    idx = torch.randint(0, config.vocab_size, (rows, seq), generator=generator)
    targets = torch.randint(0, config.vocab_size, (rows, seq), generator=generator)
    targets[0, :3] = -1
    targets[-1, -1] = -1
    return idx, targets


def loss_and_grads(model, idx, targets, reduction, call=None):
    """The loss of ``call`` (default: the model) and the gradients of the model's parameters."""
    model.zero_grad(set_to_none=True)
    loss = (model if call is None else call)(idx, targets, loss_reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close_at_scale(actual, expected, tolerance, scale, name):
    """max |actual - expected| <= tolerance * scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance * scale, (name, difference, tolerance * scale)


def assert_same_loss_and_grads(expected, actual, tolerance):
    """The loss to ``tolerance`` of its largest entry, every gradient to ``tolerance`` of the
    largest gradient entry of the model: the model's fp32 logits set the precision, and a
    scalar such as smear_lambda's gradient is a sum with cancellation."""
    (loss, grads), (patched_loss, patched_grads) = expected, actual
    assert_close_at_scale(patched_loss, loss, tolerance, loss.abs().max().item(), "loss")
    assert patched_grads.keys() == grads.keys()
    scale = max(grad.abs().max().item() for grad in grads.values())
    for name, grad in grads.items():
        assert_close_at_scale(patched_grads[name], grad, tolerance, scale, name)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a loaded 2-core machine a second intra-op thread makes each
    small op wait (ms instead of us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unpatch_after():
    """Models to unpatch after the test, so the module-level norm is this module's again."""
    models = []
    yield models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model the test unpatched already
        for model in models:
            gptfast.unpatch(model)
    assert globals()["norm"] is norm_function


norm_function = norm


def patched(model, unpatch_after, **options):
    unpatch_after.append(model)
    model, report = gptfast.patch(model, return_report=True, **options)
    return report


# ------------------------------------------------------------------------------- tests --

def test_the_tiny_model_runs_the_patched_path_and_reports_what_it_read(unpatch_after):
    model = tiny_chat()
    report = patched(model, unpatch_after)
    assert report.skipped == {}
    attention = [f"transformer.h.{i}.attn" for i in range(4)]
    assert report.names(nanochat_patch.ATTENTION) == attention
    assert report.names(nanochat_patch.LOSS) == [""]
    assert report.names(nanochat_patch.NORM) == [f"{__name__}.norm"]
    assert "q and k * 1.2 " in report.checked[attention[0]]
    assert "lm_head.weight[:50] of 64 rows, softcap 15.0" in report.checked[""]
    assert any("every model of that module" in line for line in report.process_wide)
    assert "process-wide" in str(report)
    assert globals()["norm"] is nanochat_patch.patched_norm
    assert type(model).__name__ == "TinyChat" and isinstance(model, TinyChat)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_same_loss_and_gradients_patched_on_the_reference_backend(dtype, tolerance, reduction,
                                                                  unpatch_after, monkeypatch):
    """The logits are fp32 in the model itself (.float()), so fp64 agrees to fp32's precision."""
    model = tiny_chat(dtype=dtype)
    idx, targets = batch(model.config)
    expected = loss_and_grads(model, idx, targets, reduction)
    patched(model, unpatch_after)
    calls = []
    for op in ("linear_cross_entropy", "rotary_qk_norm", "attention", "rms_norm"):
        real = getattr(gptfast.functional, op)
        monkeypatch.setattr(gptfast.functional, op,
                            lambda *a, real=real, op=op, **k: calls.append(op) or real(*a, **k))
    with gptfast.use_backend("reference"):
        actual = loss_and_grads(model, idx, targets, reduction)
    assert_same_loss_and_grads(expected, actual, tolerance)
    assert calls.count("linear_cross_entropy") == 1
    assert calls.count("rotary_qk_norm") == calls.count("attention") == 4
    assert calls.count("rms_norm") == 1 + 2 * 4 + 1  # embedding, two per block, final


@pytest.mark.parametrize("parts", [{"layer_norm": False, "attention": False}, {}],
                         ids=["loss only", "everything"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_same_loss_and_gradients_patched_on_the_triton_backend(parts, reduction, triton_backend,
                                                               unpatch_after, monkeypatch):
    """Forced triton (interpreter), fp32. Ops without a kernel yet skip with the reason."""
    monkeypatch.setenv("GPTFAST_CE_CHUNK_ROWS", "8")  # several chunks of the fused loss
    model = tiny_chat(dtype=torch.float32)
    idx, targets = batch(model.config)
    expected = loss_and_grads(model, idx, targets, reduction)
    patched(model, unpatch_after, **parts)
    try:
        actual = loss_and_grads(model, idx, targets, reduction)
    except gptfast.BackendUnavailable as err:
        pytest.skip(str(err))
    assert_same_loss_and_grads(expected, actual, 1e-5)


def test_the_triton_attention_kernel_sees_the_same_windows(triton_backend, unpatch_after,
                                                           monkeypatch):
    """Attention on the Triton kernel (interpreter, fp32) with the norms on the reference ops
    until they have kernels: windows 4 ("S", T = 16) and unlimited ("L"), forward and backward."""
    for op in ("rms_norm", "rotary_qk_norm"):
        real = getattr(gptfast.functional, op)

        def on_reference(*args, real=real, **kwargs):
            with gptfast.use_backend("reference"):
                return real(*args, **kwargs)

        monkeypatch.setattr(gptfast.functional, op, on_reference)
    calls = []
    real_attention = gptfast.functional.attention
    monkeypatch.setattr(gptfast.functional, "attention",
                        lambda *a, **k: calls.append(k["window_left"]) or real_attention(*a, **k))
    model = tiny_chat(dtype=torch.float32)
    idx, targets = batch(model.config)
    expected = loss_and_grads(model, idx, targets, "mean")
    patched(model, unpatch_after, loss=False)
    calls.clear()  # the probe's
    try:
        actual = loss_and_grads(model, idx, targets, "mean")
    except gptfast.BackendUnavailable as err:
        pytest.skip(str(err))
    assert calls == [4, 4, 4, -1]
    assert_same_loss_and_grads(expected, actual, 1e-5)


def test_windows_map_onto_flash_attentions_rule_at_every_boundary(unpatch_after):
    """Windows from 0 to past the sequence, against the model's own SDPA flash_attn_func."""
    model = tiny_chat()
    attention = model.transformer.h[0].attn
    reference_copy = copy.deepcopy(attention)
    patched(model, unpatch_after)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 32, generator=generator, dtype=torch.float64)
    cos_sin = model.cos[:, :9], model.sin[:, :9]
    for left in (-1, 0, 1, 3, 7, 8, 9, 16):
        expected = reference_copy(x, None, cos_sin, (left, 0), None)
        torch.testing.assert_close(attention(x, None, cos_sin, (left, 0), None), expected,
                                   rtol=1e-10, atol=1e-12, msg=f"window {left}")


def test_targets_none_returns_the_logits_and_a_kv_cache_keeps_nanochats_own_path(
        unpatch_after, monkeypatch):
    model = tiny_chat()
    original = copy.deepcopy(model)
    idx, _ = batch(model.config, seq=6)
    patched(model, unpatch_after)
    logits = model(idx)
    assert logits.shape == (2, 6, 50) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, original(idx), rtol=1e-6, atol=1e-6)
    assert logits.abs().max() <= 15

    cache_calls = []
    real = flash_attn.flash_attn_with_kvcache
    monkeypatch.setattr(flash_attn, "flash_attn_with_kvcache",
                        lambda *a, **k: cache_calls.append(1) or real(*a, **k))
    steps = []
    for net in (original, model):
        cache = TinyCache(model.config, 2, torch.float64)
        prefill = net(idx[:, :5], kv_cache=cache)
        steps.append((prefill, net(idx[:, 5:], kv_cache=cache)))
    assert len(cache_calls) == 2 * 2 * 4
    for expected, actual in zip(steps[0], steps[1]):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_bf16_keeps_torchs_default_eps_in_the_norm_and_the_qk_norm(unpatch_after):
    """F.rms_norm(x) with bf16 x computes in fp32 and takes fp32's epsilon (1.2e-7), not
    bf16's (7.8e-3): rows of mean square 1e-4 (the norm) and q, k of mean square ~1e-5 (the QK
    norm, small c_q/c_k weights) show it."""
    x = (torch.randn(4, 32, dtype=torch.float64) * 1e-2).bfloat16()
    torch.testing.assert_close(nanochat_patch.patched_norm(x), norm_function(x), rtol=1e-2, atol=0)

    model = tiny_chat(dtype=torch.bfloat16)
    attention = model.transformer.h[1].attn  # with a value embedding
    with torch.no_grad():
        attention.c_q.weight.mul_(1e-2)
        attention.c_k.weight.mul_(1e-2)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 32, generator=generator).bfloat16()
    ve = torch.randn(2, 9, 16, generator=generator).bfloat16()
    cos_sin = model.cos[:, :9], model.sin[:, :9]
    expected = attention(x, ve, cos_sin, (3, 0), None)
    patched(model, unpatch_after)
    assert nanochat_patch._kind(attention) == nanochat_patch.ATTENTION
    actual = attention(x, ve, cos_sin, (3, 0), None)
    # bf16 rounding, and bf16 cos/sin tables whose cos^2 + sin^2 is 1 only to ~4e-3
    assert_close_at_scale(actual, expected, 3e-2, expected.abs().max().item(), "attention")


def test_the_patched_model_compiles_in_one_graph(unpatch_after):
    """The loss path stops the model's forward at lm_head with an exception: dynamo traces it."""
    model = tiny_chat(dtype=torch.float32)
    idx, targets = batch(model.config)
    patched(model, unpatch_after)
    expected = loss_and_grads(model, idx, targets, "mean")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_loss_and_grads(expected, loss_and_grads(model, idx, targets, "mean", compiled), 1e-6)


def test_unpatch_restores_bit_identical_behaviour(unpatch_after):
    model = tiny_chat(dtype=torch.float32)
    idx, targets = batch(model.config)
    before = loss_and_grads(model, idx, targets, "none")
    classes = {name: type(m) for name, m in model.named_modules()}
    hooks = dict(model.lm_head._forward_pre_hooks)
    patched(model, unpatch_after)
    assert globals()["norm"] is not norm_function
    loss_and_grads(model, idx, targets, "none")
    assert gptfast.unpatch(model) is model
    assert globals()["norm"] is norm_function
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert dict(model.lm_head._forward_pre_hooks) == hooks
    assert not [name for m in model.modules() for name in vars(m) if name.startswith("_gptfast")]
    after = loss_and_grads(model, idx, targets, "none")
    assert torch.equal(after[0], before[0])
    assert all(torch.equal(after[1][name], grad) for name, grad in before[1].items())
    with pytest.warns(UserWarning, match="nothing to undo"):
        gptfast.unpatch(model)


def test_the_module_norm_stays_patched_while_another_patched_model_uses_it(unpatch_after):
    first, second = tiny_chat(), tiny_chat()
    patched(first, unpatch_after)
    report = patched(second, unpatch_after)
    assert report.already == [f"{__name__}.norm"]
    gptfast.unpatch(first)
    assert globals()["norm"] is nanochat_patch.patched_norm
    gptfast.unpatch(second)
    assert globals()["norm"] is norm_function


def test_a_second_patch_and_a_deepcopy_keep_the_patch(unpatch_after):
    model = tiny_chat()
    patched(model, unpatch_after)
    again = patched(model, unpatch_after)
    assert again.replaced == [] and len(again.already) == 1 + 4 + 1
    clone = copy.deepcopy(model)
    unpatch_after.append(clone)
    idx, targets = batch(model.config)
    assert nanochat_patch._kind(clone) == nanochat_patch.LOSS
    torch.testing.assert_close(clone(idx, targets), model(idx, targets), rtol=0, atol=0)


class GainOneAndAHalf(TinyAttention):
    qk_gain = 1.5


class CapThirty(TinyChat):
    attention = GainOneAndAHalf
    softcap = 30


def test_another_scale_and_softcap_are_read_from_the_model(unpatch_after):
    model = tiny_chat(CapThirty)
    idx, targets = batch(model.config)
    expected = loss_and_grads(model, idx, targets, "mean")
    report = patched(model, unpatch_after)
    assert report.skipped == {}
    assert "q and k * 1.5 " in report.checked["transformer.h.0.attn"]
    assert "softcap 30.0" in report.checked[""]
    assert_same_loss_and_grads(expected, loss_and_grads(model, idx, targets, "mean"), 1e-6)


class QAndKGains(TinyAttention):
    def sharpen(self, q, k):
        return q * 1.5, k * 1.2  # only the product matters: runs as 1.5 * 1.2 = 1.8 = 1.3416...^2


class PerHeadGain(TinyAttention):
    def sharpen(self, q, k):
        gain = torch.linspace(1.0, 1.6, q.shape[2], dtype=q.dtype)[:, None]
        return q * gain, k * 1.2


class UnequalGains(TinyChat):
    attention = QAndKGains


def test_unequal_q_and_k_factors_run_as_their_geometric_mean(unpatch_after):
    model = tiny_chat(UnequalGains)
    idx, targets = batch(model.config)
    expected = loss_and_grads(model, idx, targets, "mean")
    report = patched(model, unpatch_after)
    assert report.skipped == {}
    assert "q and k * 1.34164 " in report.checked["transformer.h.0.attn"]
    assert_same_loss_and_grads(expected, loss_and_grads(model, idx, targets, "mean"), 1e-6)


class ClampedCap(TinyChat):
    attention = PerHeadGain

    @staticmethod
    def cap(logits, softcap):
        return logits.clamp(-softcap, softcap)


def test_a_scale_and_softcap_gptfast_cannot_reproduce_leave_the_parts_alone(unpatch_after):
    model = tiny_chat(ClampedCap)
    idx, targets = batch(model.config)
    expected = loss_and_grads(model, idx, targets, "none")
    report = patched(model, unpatch_after)
    assert report.names(nanochat_patch.ATTENTION) == [] and report.names(nanochat_patch.LOSS) == []
    assert "differs from nanochat's attention" in report.skipped["transformer.h.0.attn"]
    assert "neither lm_head's nor softcap * tanh" in report.skipped[""]
    assert all(type(m) in (PerHeadGain, ClampedCap) for m in
               [model] + [block.attn for block in model.transformer.h])
    actual = loss_and_grads(model, idx, targets, "none")  # the norm alone is patched
    assert_same_loss_and_grads(expected, actual, 1e-12)


def peak_cpu_bytes(step):
    """Peak of the bytes allocated on the CPU while ``step()`` runs, above what was allocated
    before: torch.profiler(profile_memory=True) records every allocation and free with its size
    (the "[memory]" events); the peak is the largest running sum in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_peak_cpu_memory_drops_by_the_logits_size(triton_backend, unpatch_after, monkeypatch):
    """Forward + backward, fp32, V = 1000 (padded to 1024) and 128 rows: the logits are 512 kB.
    The fused loss holds one chunk of 16 rows of logits at a time; the unpatched model holds the
    lm_head output, the softcapped copies, log-softmax and their gradients. Only the loss is
    patched (the norm and rotary ops have no Triton kernel yet), so the drop is the loss's."""
    monkeypatch.setenv("GPTFAST_CE_CHUNK_ROWS", "16")
    model = tiny_chat(dtype=torch.float32, vocab_size=1000, sequence_len=32)
    idx, targets = batch(model.config, rows=4)
    logits_bytes = idx.numel() * model.config.vocab_size * 4

    def step():
        model(idx, targets).backward()

    model.zero_grad(set_to_none=True)
    unpatched = peak_cpu_bytes(step)
    patched(model, unpatch_after, layer_norm=False, attention=False)
    model.zero_grad(set_to_none=True)
    fused = peak_cpu_bytes(step)
    print(f"peak CPU bytes: unpatched {unpatched}, patched {fused}, logits {logits_bytes}")
    assert unpatched - fused >= logits_bytes


def test_unpatch_undoes_the_nanogpt_style_and_hf_patches():
    class NanoLayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return F.layer_norm(x, (8,), self.weight, self.bias, 1e-5)

    model = nn.Sequential(nn.LayerNorm(8), NanoLayerNorm(), gptfast.nn.LayerNorm(8))
    report = gptfast.patch(model, return_report=True)[1]
    assert report.replaced == ["0", "1"]
    gptfast.unpatch(model)
    assert [type(m) for m in model] == [nn.LayerNorm, NanoLayerNorm, gptfast.nn.LayerNorm]
    assert not [name for m in model.modules() for name in vars(m) if name.startswith("_gptfast")]

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8, vocab_size=11,
                                     attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(config)
    gptfast.patch(hf)
    assert hf.config._attn_implementation == "gptfast"
    gptfast.unpatch(hf)
    assert hf.config._attn_implementation == "sdpa"
    assert not any(vars(m).get("_gptfast_attention") for m in hf.modules())
    assert not any(isinstance(m, gptfast.nn.LayerNorm) for m in hf.modules())
