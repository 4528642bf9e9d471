"""gptfast.model_modern: today's GPT (nanochat's choices) against a plain-PyTorch model written
here, nanochat's shapes, the softcapped fused loss's memory, generation, config checks."""

import dataclasses
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gptfast
from gptfast.backend import BackendUnavailable
from gptfast.model import GPT, GPTConfig
from gptfast.model_modern import ModernGPT, rotary_tables

# every choice away from GPT-2's, windows that bite (S layers see 5 earlier tokens at T=24)
TINY = dict(block_size=24, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
            short_window=5)


def tiny(**overrides):
    return GPT(GPTConfig.preset("nanochat-d12", **{**TINY, **overrides})).eval()


def scramble(model, std=0.3):
    """Weights far from the init (whose output projections are zero), so every one matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def shifted_targets(idx):
    targets = torch.full_like(idx, -1)
    targets[:, :-1] = idx[:, 1:]
    return targets


# --------------------------------------------------------------- nanochat's shapes --

@pytest.mark.parametrize("name,depth,width", [("nanochat-d12", 12, 768), ("nanochat-d20", 20, 1280),
                                              ("nanochat-d26", 26, 1664)])
def test_presets_have_nanochats_shapes_and_parameter_counts(name, depth, width):
    """nanochat's base_train: model_dim = depth * 64 rounded up to the head dim 128, heads =
    model_dim / 128, n_kv_head = heads, sequence_len 2048, vocab 2**15; num_scaling_params
    counts wte V*C, lm_head V*C and per block c_q C*C, c_k and c_v C*(kv*128), c_proj C*C,
    the MLP 8*C*C (value embeddings, their gates and the scalars are not modelled)."""
    config = GPTConfig.preset(name)
    assert (config.n_layer, config.n_embd) == (depth, width) == (depth, -(-64 * depth // 128) * 128)
    assert config.n_embd // config.n_head == 128 and config.kv_heads == config.n_head
    assert (config.block_size, config.vocab_size, config.bias) == (2048, 32768, False)
    assert (config.norm, config.position, config.rotary_base, config.mlp) == \
        ("rmsnorm", "rotary", 100000.0, "relu2")
    assert (config.qk_norm, config.qk_scale, config.tie_embeddings, config.logit_softcap,
            config.embedding_norm) == (True, 1.2, False, 15.0, True)
    # "SSSL" tiled, last layer long; S = window_left 512 (a quarter of 2048 in 128-key tiles),
    # which causal_attention counts as 513 positions with the query itself
    windows = config.layer_windows()
    assert windows == [None if i % 4 == 3 or i == depth - 1 else 513 for i in range(depth)]

    with torch.device("meta"):
        model = GPT(config)
    assert isinstance(model, ModernGPT) and isinstance(model, GPT)
    V, C, kv = 32768, width, config.kv_heads * 128
    per_block = C * C + 2 * C * kv + C * C + 8 * C * C
    assert sum(p.numel() for p in model.parameters()) == 2 * V * C + depth * per_block
    assert model.num_params() == model.num_params(False) - V * C  # the wte lookup left out
    block = model.transformer.h[0]
    assert (block.attn.c_q.weight.shape, block.attn.c_k.weight.shape, block.mlp.c_fc.weight.shape) \
        == ((C, C), (kv, C), (4 * C, C))
    assert not [b for b in model.buffers(recurse=True) if b.numel() == 0]
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # no rotary tables
    if name == "nanochat-d20":
        assert sum(p.numel() for p in model.parameters()) == 477_102_080


def test_rotary_tables_are_nanochats_fp32_tables():
    """nanochat's _precompute_rotary_embeddings: fp32 channel range, inverse frequencies and
    positions, cos/sin of their outer product."""
    model = tiny()
    inv_freq = 1.0 / 100000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    angles = torch.outer(torch.arange(24, dtype=torch.float32), inv_freq)
    assert torch.equal(model.rotary_cos, angles.cos()) and torch.equal(model.rotary_sin, angles.sin())


def test_flops_per_token_is_nanochats_window_aware_estimate():
    model = tiny()
    T, H, D = 24, 4, 16
    matmul = sum(p.numel() for n, p in model.named_parameters() if n != "transformer.wte.weight")
    assert model.flops_per_token() == 6 * matmul + 12 * H * D * (6 + 6 + T)
    assert model.flops_per_token(4) == 6 * matmul + 12 * H * D * (4 + 4 + 4)


# --------------------------------------------- the loss against plain PyTorch (fp64) --

def nanochat_rotate(x, cos, sin):
    """nanochat's apply_rotary_emb: the two halves rotated by -theta."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def plain_loss(model, idx, targets, softcap=15.0, sign=1.0):
    """The modern model written out in plain PyTorch: norm after the embedding, blocks of
    x + attn(norm(x)), x + mlp(norm(x)) with rotary + QK-norm * 1.2, GQA, windowed causal
    SDPA, relu^2, a final norm, lm_head, the softcap, F.cross_entropy (-1 ignored)."""
    cfg = model.config
    B, T = idx.shape
    C, H, Hkv = cfg.n_embd, cfg.n_head, cfg.kv_heads
    D = C // H
    t = model.transformer

    def norm(x):
        return F.rms_norm(x, (x.shape[-1],))

    inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos(), sign * angles.sin()
    x = norm(t.wte.weight[idx])
    pattern = cfg.window_pattern
    for i, block in enumerate(t.h):
        short = pattern[i % len(pattern)] == "S" and i != cfg.n_layer - 1
        a = norm(x)
        q = (a @ block.attn.c_q.weight.T).view(B, T, H, D)
        k = (a @ block.attn.c_k.weight.T).view(B, T, Hkv, D)
        v = (a @ block.attn.c_v.weight.T).view(B, T, Hkv, D)
        q = norm(nanochat_rotate(q, cos, sin)) * cfg.qk_scale
        k = norm(nanochat_rotate(k, cos, sin)) * cfg.qk_scale
        rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = cols <= rows
        if short:
            visible &= rows - cols <= cfg.short_window  # FA's window_left
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        x = x + y.transpose(1, 2).reshape(B, T, C) @ block.attn.c_proj.weight.T
        m = norm(x)
        x = x + F.relu(m @ block.mlp.c_fc.weight.T).square() @ block.mlp.c_proj.weight.T
    logits = norm(x) @ model.lm_head.weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def fp64_model():
    torch.manual_seed(1)
    model = scramble(tiny())
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # raw logits past the cap of 15
    model.double()
    # fp64 rotary tables: the fp32 ones rotate with cos^2 + sin^2 = 1 +- 1e-7 only, which
    # would keep norm-then-rotate (rotary_qk_norm) and nanochat's rotate-then-norm ~1e-9 apart
    model.rotary_cos, model.rotary_sin = rotary_tables(24, 16, model.config.rotary_base,
                                                       dtype=torch.float64)
    return model


def test_loss_and_gradients_equal_plain_pytorch_in_fp64(fp64_model):
    model = fp64_model
    idx = torch.randint(0, 97, (2, 24))
    targets = shifted_targets(idx)
    targets[1, :3] = -1
    with gptfast.use_backend("reference"):
        expected = plain_loss(model, idx, targets)
        expected_grads = grads_of(model, expected)
        logits, loss = model(idx, targets)
        assert 14.0 < logits.abs().max() <= 15.0  # capped, and the cap bites
        torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
        _, fused = model(idx, targets, return_logits=False)
        torch.testing.assert_close(fused, expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grads_of(model, fused), expected_grads, atol=1e-12, rtol=1e-10)
        # each of these choices changes the loss, so the match above pins them all down
        for changed in (plain_loss(model, idx, targets, softcap=None),
                        plain_loss(model, idx, targets, sign=-1.0)):
            assert (changed - expected).abs() > 1e-3
        windowless = dataclasses.replace(model.config, window_pattern=None)
        other = GPT(windowless).double()
        other.load_state_dict(model.state_dict())
        assert (other(idx, targets)[1] - expected).abs() > 1e-3


def test_fused_softcapped_loss_on_the_triton_kernel_matches_reference(fp64_model, monkeypatch):
    """The lm_head + softcap + cross-entropy of the model on the Triton kernel (interpreter),
    in chunks of 8 rows, against the reference backend, in fp32."""
    pytest.importorskip("triton")
    from gptfast.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_ROWS", 8)
    model = fp64_model.float()
    idx = torch.randint(0, 97, (2, 24))
    targets = shifted_targets(idx)
    hidden = model.hidden_states(idx).detach().requires_grad_()

    def run():
        model.zero_grad()
        hidden.grad = None
        loss = model.fused_loss(hidden, targets)
        loss.backward()
        return loss, hidden.grad.clone(), model.lm_head.weight.grad.clone()

    with gptfast.use_backend("reference"):
        expected = run()
    with gptfast.use_backend("triton"):
        try:
            got = run()
        except BackendUnavailable as err:
            pytest.skip(str(err))
    for name, a, b in zip(("loss", "grad x", "grad lm_head"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_whole_model_on_the_triton_backend_matches_reference(fp64_model):
    """Forced "triton" for every op of the model; skips, naming the op, while one of
    rms_norm / add_rms_norm / rotary_qk_norm has no kernel yet."""
    pytest.importorskip("triton")
    model = fp64_model.float()
    idx = torch.randint(0, 97, (1, 24))
    targets = shifted_targets(idx)

    def run():
        _, loss = model(idx, targets, return_logits=False)
        return loss, grads_of(model, loss)

    with gptfast.use_backend("reference"):
        expected_loss, expected_grads = run()
    with gptfast.use_backend("triton"):
        try:
            loss, grads = run()
        except BackendUnavailable as err:
            pytest.skip(str(err))
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads, expected_grads, atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------- peak memory --

class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive (CPU): each
    op's new output storages are counted until they are freed (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.sizes or storage.nbytes() == 0:
                continue
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.sizes.pop(key)


def test_fused_loss_peak_memory_stays_below_the_logits(monkeypatch):
    """nanochat's head (logits = lm_head(x).float(), softcap, F.cross_entropy) against the
    model's fused_loss on the Triton kernel (interpreter; 16-row chunks as a real run's
    chunk_rows would pick at full size): the fused forward + backward holds less than the
    (N, V) fp32 logits alone, the materialised one several times them."""
    pytest.importorskip("triton")
    from gptfast.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_ROWS", 16)
    model = tiny(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, vocab_size=2048, block_size=32)
    B, T, V = 4, 32, 2048
    idx = torch.randint(0, V, (B, T))
    hidden = model.hidden_states(idx).detach().requires_grad_()
    logits_bytes = B * T * V * 4

    def nanochat_head():
        logits = model.lm_head(hidden).float()
        logits = 15 * torch.tanh(logits / 15)
        return F.cross_entropy(logits.view(-1, V), idx.view(-1), ignore_index=-1)

    peaks = {}
    for name, loss_of in (("materialised", nanochat_head),
                          ("fused", lambda: model.fused_loss(hidden, idx))):
        with gptfast.use_backend("triton" if name == "fused" else "reference"):
            with LiveBytes() as meter:
                try:
                    loss_of().backward()
                except BackendUnavailable as err:
                    pytest.skip(str(err))
        model.zero_grad()
        hidden.grad = None
        peaks[name] = meter.peak
    assert peaks["materialised"] >= 3 * logits_bytes, peaks
    assert peaks["fused"] < logits_bytes, peaks
    assert peaks["fused"] + logits_bytes <= peaks["materialised"], peaks


# ---------------------------------------------------------------------- generation --

def test_generation_with_a_cache_equals_without_and_uses_capped_logits():
    torch.manual_seed(0)
    model = scramble(tiny(block_size=16, short_window=3), std=0.5)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # raw logits past the cap of 15
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, 14, temperature=0)  # runs past block_size 16: refilled
    uncached = model.generate(prompt, 14, temperature=0, use_cache=False)
    assert cached.shape == (2, 19) and cached[:, 5:].unique().numel() > 2
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)
    logits, _ = model(prompt)
    raw = model.lm_head(model.hidden_states(prompt)[:, [-1]])
    assert raw.abs().max() > 15
    torch.testing.assert_close(logits, 15 * torch.tanh(raw / 15))


def test_document_masks_and_learned_positions_with_layernorm_also_work():
    """The choices combine: LayerNorm with biases, learned positions, GELU, tied embeddings,
    GQA and document masks."""
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
                       attention="document", eot_token=0, bias=True)
    model = scramble(GPT(config).eval(), std=0.2)
    assert isinstance(model, ModernGPT) and model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.wpe.weight" in model.state_dict()
    prompt = torch.tensor([[3, 4, 0, 5, 6, 7]])
    cached = model.generate(prompt, 6, temperature=0)
    torch.testing.assert_close(cached, model.generate(prompt, 6, temperature=0, use_cache=False))
    # a token after an end-of-text sees only its own document: earlier tokens do not matter
    a, _ = model(torch.tensor([[3, 4, 0, 5, 6]]))
    b, _ = model(torch.tensor([[9, 8, 0, 5, 6]]))
    torch.testing.assert_close(a, b)


def test_crop_block_size_keeps_each_layers_window():
    model = GPT(GPTConfig.preset("nanochat-d12", n_layer=2, n_embd=128, n_head=1, block_size=1024,
                                 vocab_size=64))
    windows = model.config.layer_windows()
    model.crop_block_size(100)
    assert model.config.block_size == 100 and model.config.layer_windows() == windows == [257, None]
    assert model.rotary_cos.shape == (100, 64)
    model(torch.zeros(1, 100, dtype=torch.long))


# -------------------------------------------------------------------------- config --

def test_gpt2_defaults_build_the_gpt2_model_and_any_modern_choice_the_modern_one():
    base = dict(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8)
    assert type(GPT(GPTConfig(**base))) is GPT
    for choice in (dict(norm="rmsnorm"), dict(position="rotary"), dict(mlp="relu2"),
                   dict(qk_norm=True), dict(tie_embeddings=False), dict(n_kv_head=1),
                   dict(window_pattern="SL"), dict(logit_softcap=30.0), dict(embedding_norm=True)):
        assert type(GPT(GPTConfig(**base, **choice))) is ModernGPT, choice
    assert type(GPT(GPTConfig(**base, n_kv_head=2, rotary_base=500.0))) is GPT  # no change


@pytest.mark.parametrize("fields,message", [
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(position="alibi"), "position must be one of"),
    (dict(mlp="swiglu"), "mlp must be one of"),
    (dict(n_kv_head=3), r"n_head \(4\) must be a multiple of n_kv_head \(3\)"),
    (dict(window_pattern="SXL"), "window_pattern must be None or a string of S and L"),
    (dict(window_pattern=""), "window_pattern must be None or a string of S and L"),
    (dict(logit_softcap=0.0), "logit_softcap must be None or a finite number > 0"),
    (dict(qk_scale=1.2), "qk_scale .* needs qk_norm=True"),
    (dict(short_window=0), "short_window must be None or a positive int"),
    (dict(qk_norm=1), "qk_norm must be True or False"),
    (dict(n_embd=12, n_head=4, position="rotary"), "rotary positions need an even head dim"),
])
def test_bad_modern_fields_are_errors_naming_them(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**dict(block_size=8, vocab_size=16, n_layer=1, n_head=4, n_embd=16), **fields})


def test_unknown_preset_lists_the_nanochat_names_too():
    with pytest.raises(ValueError, match="nanochat-d12, nanochat-d20, nanochat-d26"):
        GPTConfig.preset("nanochat-d32")
    assert GPTConfig.preset("nanochat-d20", vocab_size=100).vocab_size == 100
    assert math.isclose(GPTConfig.preset("nanochat-d26").n_embd / 128, 13)
