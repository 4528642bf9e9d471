"""gptfast.model: the GPT against Hugging Face GPT-2, checkpoint loading, generation, accounting."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.model import (
    GPT,
    PEAK_BF16_FLOPS,
    GPTConfig,
    device_peak_flops,
    peak_flops_for_name,
)

SMALL = dict(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64)
FP32 = dict(atol=1e-5, rtol=1e-5)


def small_gpt(**overrides):
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


def scramble(model, std=0.3):
    """Weights far from the tiny GPT-2 init, so outputs depend on every parameter."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def shifted_targets(idx):
    """Next-token targets for idx, the last position ignored (-1), as HF's labels=idx."""
    targets = torch.full_like(idx, -1)
    targets[:, :-1] = idx[:, 1:]
    return targets


# ------------------------------------------------------------------ Hugging Face GPT-2 --

@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return scramble(transformers.GPT2LMHeadModel(config).eval())


def assert_matches_hf(ours, hf):
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        hf_out = hf(idx, labels=idx)
        logits, loss = ours(idx, shifted_targets(idx))
    torch.testing.assert_close(logits, hf_out.logits, **FP32)
    torch.testing.assert_close(loss, hf_out.loss, **FP32)
    manual = F.cross_entropy(hf_out.logits[:, :-1].reshape(-1, 101), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual, **FP32)


def test_from_pretrained_safetensors_matches_hf_logits_and_loss(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config == GPTConfig(**SMALL)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert_matches_hf(ours, hf_gpt2)


def test_from_pretrained_pytorch_bin_in_hub_layout(hf_gpt2, tmp_path):
    """pytorch_model.bin as the hub's gpt2 ships it: no "transformer." prefix, mask buffers."""
    hf_gpt2.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf_gpt2.state_dict().items()
             if k != "lm_head.weight"}
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_matches_hf(GPT.from_pretrained(tmp_path).eval(), hf_gpt2)


def test_from_pretrained_sharded_safetensors(hf_gpt2, tmp_path):
    from safetensors.torch import save_file

    hf_gpt2.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf_gpt2.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, tmp_path / shard)
        weight_map.update({k: shard for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_matches_hf(GPT.from_pretrained(tmp_path).eval(), hf_gpt2)


def test_from_pretrained_rejects_what_it_cannot_load(hf_gpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local path nor.*huggingface-cli download"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="may only override 'dropout'"):
        GPT.from_pretrained("gpt2", dict(bias=False))
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        GPT.from_pretrained(tmp_path)

    hf_gpt2.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(tmp_path)

    state = dict(hf_gpt2.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\], "
                                         r"unexpected \['transformer.extra.weight'\]"):
        GPT.from_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_takes_nanogpts_model_type_and_override_args(hf_gpt2, tmp_path, monkeypatch):
    """nanoGPT's sample.py/train.py: ``GPT.from_pretrained("gpt2", dict(dropout=0.0))``."""
    hf_gpt2.save_pretrained(tmp_path)
    fetched = []
    monkeypatch.setattr(gptfast.model, "_download_hf_gpt2",
                        lambda name: fetched.append(name) or str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no local "gpt2-medium" here
    model = GPT.from_pretrained("gpt2-medium", dict(dropout=0.1))
    assert fetched == ["gpt2-medium"] and model.config.dropout == 0.1
    assert_matches_hf(model.eval(), hf_gpt2)
    (tmp_path / "gpt2").mkdir()  # a local path of that name wins over the hub
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        GPT.from_pretrained("gpt2")
    assert fetched == ["gpt2-medium"]


# --------------------------------------------------------------------- nanoGPT ckpt.pt --

def test_from_pretrained_nanogpt_checkpoint_with_compile_prefixes(tmp_path):
    source = scramble(small_gpt(bias=False))
    state = {"_orig_mod." + k: v for k, v in source.state_dict().items()}
    state["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    checkpoint = {"model": state, "model_args": dataclasses.asdict(source.config),
                  "iter_num": 7, "best_val_loss": 1.5, "config": {"dataset": "shakespeare"}}
    torch.save(checkpoint, tmp_path / "ckpt.pt")

    idx = torch.randint(0, 101, (2, 20))
    expected, _ = source(idx, idx)
    for path in (tmp_path / "ckpt.pt", tmp_path):
        loaded = GPT.from_pretrained(path, dropout=0.1).eval()
        assert loaded.config == dataclasses.replace(source.config, dropout=0.1)
        torch.testing.assert_close(loaded(idx, idx)[0], expected, atol=0, rtol=0)

    torch.save({"model": state}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a nanoGPT checkpoint"):
        GPT.from_pretrained(tmp_path / "ckpt.pt")


# -------------------------------------------------------------------------- generation --

@pytest.fixture
def varied_gpt():
    """A small model whose greedy continuations do not collapse into one repeated token."""
    torch.manual_seed(0)
    return scramble(small_gpt(block_size=16), std=0.5)


def test_generate_greedy_with_cache_equals_without(varied_gpt):
    prompt = torch.randint(0, 101, (2, 5))
    cached = varied_gpt.generate(prompt, 8, temperature=0)
    uncached = varied_gpt.generate(prompt, 8, temperature=0, use_cache=False)
    assert cached.shape == (2, 13)
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)
    torch.testing.assert_close(cached[:, :5], prompt, atol=0, rtol=0)
    assert cached[:, 5:].unique().numel() > 2
    top1 = varied_gpt.generate(prompt, 8, temperature=0.7, top_k=1)
    torch.testing.assert_close(top1, cached, atol=0, rtol=0)


def test_generate_past_block_size_crops_the_context(varied_gpt):
    """Prompt + new tokens run past block_size 16: the cache is refilled from the last 16."""
    prompt = torch.randint(0, 101, (1, 12))
    cached = varied_gpt.generate(prompt, 14, temperature=0)
    uncached = varied_gpt.generate(prompt, 14, temperature=0, use_cache=False)
    assert cached.shape == (1, 26)
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)

    # the nanoGPT loop written out: argmax of the last logits of the last block_size tokens
    idx = prompt
    for _ in range(14):
        logits, _ = varied_gpt(idx[:, -16:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    torch.testing.assert_close(cached, idx, atol=0, rtol=0)

    long_prompt = torch.randint(0, 101, (1, 40))  # longer than block_size from the start
    torch.testing.assert_close(varied_gpt.generate(long_prompt, 3, temperature=0),
                               varied_gpt.generate(long_prompt, 3, temperature=0, use_cache=False))


def test_generate_sampling_is_seeded_and_within_vocab(varied_gpt):
    prompt = torch.randint(0, 101, (3, 4))
    torch.manual_seed(123)
    first = varied_gpt.generate(prompt, 20, temperature=1.3, top_k=500)  # top_k clamps to 101
    torch.manual_seed(123)
    second = varied_gpt.generate(prompt, 20, temperature=1.3, top_k=500, use_cache=False)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert first.shape == (3, 24) and first.dtype == prompt.dtype
    assert int(first.min()) >= 0 and int(first.max()) < 101
    torch.manual_seed(5)
    top3 = varied_gpt.generate(prompt, 6, top_k=3)
    last_logits, _ = varied_gpt(top3[:, :-1])
    allowed = last_logits[:, -1].topk(3).indices
    assert (allowed == top3[:, -1:]).any(dim=1).all()
    assert varied_gpt.generate(prompt, 0).equal(prompt)


def test_generate_bad_arguments(varied_gpt):
    prompt = torch.zeros(1, 3, dtype=torch.long)
    for kwargs, match in [(dict(max_new_tokens=-1), "max_new_tokens"),
                          (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
                          (dict(max_new_tokens=2, top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=match):
            varied_gpt.generate(prompt, **kwargs)
    with pytest.raises(ValueError, match="idx must be a"):
        varied_gpt.generate(torch.zeros(3, dtype=torch.long), 2)


# ------------------------------------------------------------------ model and config --

def test_parameter_names_are_nanogpts():
    per_block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = (["transformer.wte.weight", "transformer.wpe.weight"]
                + [f"transformer.h.{i}.{name}" for i in range(2) for name in per_block]
                + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    model = small_gpt()
    assert [name for name, _ in model.named_parameters()] == expected
    assert list(model.state_dict()) == expected + ["lm_head.weight"]
    no_bias = [n for n, _ in small_gpt(bias=False).named_parameters()]
    assert no_bias == [n for n in expected if not n.endswith(".bias")]
    assert isinstance(model.transformer.h[0].ln_1, gptfast.nn.LayerNorm)
    assert isinstance(model.transformer.h[0].attn, gptfast.nn.CausalSelfAttention)


def test_init_statistics_and_weight_tying():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj_std = 0.02 / math.sqrt(2 * 4)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.c_attn.bias.abs().max().item() == 0.0
        assert block.ln_1.weight.eq(1).all() and block.ln_1.bias.eq(0).all()
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_forward_shapes_and_input_checks():
    model = small_gpt()
    idx = torch.randint(0, 101, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 101) and loss is None
    full, _ = model(idx, idx)
    torch.testing.assert_close(logits[:, 0], full[:, -1], **FP32)
    with pytest.raises(ValueError, match="length 33.*block_size is only 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets must be a tensor of idx's shape"):
        model(idx, idx[:, :5])


def test_loss_ignores_minus_one_and_fused_loss_matches():
    model = scramble(small_gpt(), std=0.1)
    idx = torch.randint(0, 101, (2, 12))
    targets = torch.randint(0, 101, (2, 12))
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]), **FP32)

    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    no_logits, fused = model(idx, targets, return_logits=False)
    assert no_logits is None
    torch.testing.assert_close(fused, loss, **FP32)
    fused.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter():
    model = small_gpt().train()
    idx = torch.randint(0, 101, (2, 32))  # every position, so wpe gets gradient everywhere
    _, loss = model(idx, shifted_targets(idx))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    model = small_gpt(dropout=0.2)
    idx = torch.randint(0, 101, (2, 16))
    model.eval()
    torch.testing.assert_close(model(idx, idx)[0], model(idx, idx)[0], atol=0, rtol=0)
    eval_logits = model(idx, idx)[0]
    model.train()
    assert not torch.allclose(model(idx, idx)[0], eval_logits, atol=1e-4)


def test_block_math_is_nanogpts():
    """The fused residual adds give nanoGPT's x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""
    model = scramble(small_gpt(), std=0.2)
    idx = torch.randint(0, 101, (2, 9))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(9))
    for block in t.h:
        x = x + block.attn(F.layer_norm(x, (64,), block.ln_1.weight, block.ln_1.bias))
        h = F.layer_norm(x, (64,), block.ln_2.weight, block.ln_2.bias)
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
    x = F.layer_norm(x, (64,), t.ln_f.weight, t.ln_f.bias)
    torch.testing.assert_close(model(idx, idx)[0], model.lm_head(x), **FP32)


def test_model_under_triton_backend_matches_reference(triton_backend):
    from gptfast.backend import triton_unavailable

    ops = ("layer_norm", "add_layer_norm", "causal_attention", "cross_entropy")
    missing = [op for op in ops if triton_unavailable(op, torch.device("cpu"), check_case=False)]
    if missing:
        pytest.skip(f"no usable Triton kernel for {missing}")
    model = scramble(small_gpt(n_layer=1, n_embd=32, n_head=2), std=0.1)
    idx = torch.randint(0, 101, (1, 8))

    def run(return_logits=True):
        model.zero_grad()
        logits, loss = model(idx, idx, return_logits=return_logits)
        loss.backward()
        return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    with gptfast.use_backend("reference"):
        expected_logits, expected_loss, expected_grads = run()
    logits, loss, grads = run()  # the logits returned next to the loss must stay logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads, expected_grads, atol=1e-4, rtol=1e-3)
    if not triton_unavailable("linear_cross_entropy", torch.device("cpu"), check_case=False):
        _, fused_loss, fused_grads = run(return_logits=False)
        torch.testing.assert_close(fused_loss, expected_loss, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused_grads, expected_grads, atol=1e-4, rtol=1e-3)


def test_config_presets_and_validation():
    sizes = {name: (c.n_layer, c.n_head, c.n_embd) for name in
             ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
             for c in [GPTConfig.preset(name)]}
    assert sizes == {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                     "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    gpt2 = GPTConfig.preset("gpt2")
    assert (gpt2.vocab_size, gpt2.block_size, gpt2.bias) == (50257, 1024, True)
    assert GPTConfig.preset("gpt2", vocab_size=50304, dropout=0.1).vocab_size == 50304
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(12\)"):
        GPTConfig(n_embd=100)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        GPTConfig(block_size=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(SMALL))


def test_num_params_of_gpt2_is_nanogpts_124m():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_params() == 123_653_376  # nanoGPT: "number of parameters: 123.65M"
    assert model.num_params(non_embedding=False) == 123_653_376 + 1024 * 768


# ------------------------------------------------------------------------- accounting --

def test_flops_per_token_formula():
    model = small_gpt()
    n = model.num_params()
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 16 * 16
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 16 * 32


def test_mfu_is_none_on_cpu():
    model = small_gpt()
    assert model.mfu(1e5, 32, device="cpu") is None
    assert device_peak_flops("cpu") is None
    if not torch.cuda.is_available():
        assert model.mfu(1e5) is None
        assert device_peak_flops() is None


def test_estimate_mfu_is_nanogpts_a100_fraction_on_every_device():
    """nanoGPT's train.py prints ``raw_model.estimate_mfu(batch_size * grad_accum, dt) * 100``."""
    model = small_gpt()
    n = model.get_num_params()
    L, H, Q, T = (model.config.n_layer, model.config.n_head,
                  model.config.n_embd // model.config.n_head, model.config.block_size)
    nanogpt = (6 * n + 12 * L * H * Q * T) * T * 12 * (1.0 / 0.5) / 312e12
    assert model.estimate_mfu(12, 0.5) == pytest.approx(nanogpt, rel=1e-12)
    assert model.get_num_params(False) == model.num_params(False) > model.get_num_params()


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("NVIDIA L40", None),            # not "L4", not "L40S"
    ("NVIDIA A10G", None),           # not "A10"
    ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA GH200 480GB", None),    # not "H200"
    ("AMD Instinct MI300X", None),
])
def test_peak_flops_matches_names_by_whole_words(name, flops):
    assert peak_flops_for_name(name) == flops


def test_device_peak_flops_reads_the_cuda_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak_flops() == PEAK_BF16_FLOPS["H100 PCIe"]
    assert device_peak_flops("cuda:0") == 756e12
    model = small_gpt()
    mfu = model.mfu(1e6, 32, device="cuda")
    assert mfu == pytest.approx(model.flops_per_token(32) * 1e6 / 756e12)


def test_configure_optimizers_decays_matrices_only():
    model = small_gpt()
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert optimizer.defaults["lr"] == 6e-4 and optimizer.defaults["betas"] == (0.9, 0.95)
