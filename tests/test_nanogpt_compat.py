"""nanoGPT's train.py and sample.py, as written there, run on ``gptfast.GPT`` unmodified.

The loops below keep every call nanoGPT makes on its model (GPTConfig(**model_args), GPT,
from_pretrained(init_from, override_args), crop_block_size, configure_optimizers,
model(X, Y), estimate_mfu(batch_size * gradient_accumulation_steps, dt), generate, the
checkpoint dict and its resume), with its defaults scaled down to a CPU test; only the
imports point at gptfast.
"""

import math
import os
import pickle
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import gptfast
from gptfast import GPT, GPTConfig

CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))


@pytest.fixture
def shakespeare_char(tmp_path):
    """nanoGPT's data/shakespeare_char layout: train.bin, val.bin (uint16) and meta.pkl."""
    data_dir = tmp_path / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    stoi = {ch: i for i, ch in enumerate(CHARS)}
    itos = {i: ch for i, ch in enumerate(CHARS)}
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 60
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    ids[: int(len(ids) * 0.9)].tofile(data_dir / "train.bin")
    ids[int(len(ids) * 0.9):].tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": itos, "stoi": stoi}, f)
    return tmp_path


def nanogpt_train(root, init_from="scratch", max_iters=30, block_size=16, out_dir="out"):
    """nanoGPT's train.py (single process, no DDP, compile=False), its logic unchanged."""
    out_dir = os.path.join(root, out_dir)
    eval_interval, log_interval, eval_iters = 10, 1, 2
    always_save_checkpoint = True
    dataset = "shakespeare_char"
    gradient_accumulation_steps, batch_size = 2, 4
    n_layer, n_head, n_embd, dropout, bias = 2, 2, 32, 0.0, False
    learning_rate, weight_decay, beta1, beta2, grad_clip = 3e-3, 1e-1, 0.9, 0.95, 1.0
    decay_lr, warmup_iters, lr_decay_iters, min_lr = True, 5, max_iters, 3e-4
    device, dtype = "cpu", "float32"
    config = dict(dataset=dataset, batch_size=batch_size, block_size=block_size)
    os.makedirs(out_dir, exist_ok=True)
    device_type = "cuda" if "cuda" in device else "cpu"
    ctx = nullcontext()

    data_dir = os.path.join(root, "data", dataset)

    def get_batch(split):
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
        return x, y

    iter_num = 0
    best_val_loss = 1e9
    meta_path = os.path.join(data_dir, "meta.pkl")
    meta_vocab_size = None
    if os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
        meta_vocab_size = meta["vocab_size"]

    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      bias=bias, vocab_size=None, dropout=dropout)
    if init_from == "scratch":
        model_args["vocab_size"] = meta_vocab_size if meta_vocab_size is not None else 50304
        gptconf = GPTConfig(**model_args)
        model = GPT(gptconf)
    elif init_from == "resume":
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
        checkpoint = torch.load(ckpt_path, map_location=device)
        checkpoint_model_args = checkpoint["model_args"]
        for k in ["n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"]:
            model_args[k] = checkpoint_model_args[k]
        gptconf = GPTConfig(**model_args)
        model = GPT(gptconf)
        state_dict = checkpoint["model"]
        unwanted_prefix = "_orig_mod."
        for k, v in list(state_dict.items()):
            if k.startswith(unwanted_prefix):
                state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
        model.load_state_dict(state_dict)
        iter_num = checkpoint["iter_num"]
        best_val_loss = checkpoint["best_val_loss"]
    elif init_from.startswith("gpt2"):
        override_args = dict(dropout=dropout)
        model = GPT.from_pretrained(init_from, override_args)
        for k in ["n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"]:
            model_args[k] = getattr(model.config, k)
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
        model_args["block_size"] = block_size
    model.to(device)

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    if init_from == "resume":
        optimizer.load_state_dict(checkpoint["optimizer"])
    checkpoint = None

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y = get_batch(split)
                with ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return min_lr + coeff * (learning_rate - min_lr)

    log = []
    X, Y = get_batch("train")
    t0 = time.time()
    local_iter_num = 0
    raw_model = model
    running_mfu = -1.0
    while True:
        lr = get_lr(iter_num) if decay_lr else learning_rate
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % eval_interval == 0:
            losses = estimate_loss()
            log.append(("eval", iter_num, float(losses["train"]), float(losses["val"])))
            if losses["val"] < best_val_loss or always_save_checkpoint:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    checkpoint = {
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "model_args": model_args,
                        "iter_num": iter_num,
                        "best_val_loss": best_val_loss,
                        "config": config,
                    }
                    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
        for micro_step in range(gradient_accumulation_steps):
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps
            X, Y = get_batch("train")
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        dt = t1 - t0
        t0 = t1
        if iter_num % log_interval == 0:
            lossf = loss.item() * gradient_accumulation_steps
            if local_iter_num >= 5:
                mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            log.append(("iter", iter_num, lossf, running_mfu))
        iter_num += 1
        local_iter_num += 1
        if iter_num > max_iters:
            break
    return model, log


def nanogpt_sample(root, init_from="resume", out_dir="out", start="\n", max_new_tokens=20):
    """nanoGPT's sample.py (its meta.pkl decoding included), compile=False."""
    device, seed, num_samples, temperature, top_k = "cpu", 1337, 2, 0.8, 200
    torch.manual_seed(seed)
    ctx = nullcontext()
    if init_from == "resume":
        ckpt_path = os.path.join(root, out_dir, "ckpt.pt")
        checkpoint = torch.load(ckpt_path, map_location=device)
        gptconf = GPTConfig(**checkpoint["model_args"])
        model = GPT(gptconf)
        state_dict = checkpoint["model"]
        unwanted_prefix = "_orig_mod."
        for k, v in list(state_dict.items()):
            if k.startswith(unwanted_prefix):
                state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
        model.load_state_dict(state_dict)
    elif init_from.startswith("gpt2"):
        model = GPT.from_pretrained(init_from, dict(dropout=0.0))
    model.eval()
    model.to(device)
    load_meta = False
    if init_from == "resume" and "config" in checkpoint and "dataset" in checkpoint["config"]:
        meta_path = os.path.join(root, "data", checkpoint["config"]["dataset"], "meta.pkl")
        load_meta = os.path.exists(meta_path)
    assert load_meta
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    stoi, itos = meta["stoi"], meta["itos"]
    encode = lambda s: [stoi[c] for c in s]  # noqa: E731 (nanoGPT's code)
    decode = lambda l: "".join([itos[i] for i in l])  # noqa: E731
    start_ids = encode(start)
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
    samples = []
    with torch.no_grad():
        with ctx:
            for k in range(num_samples):
                y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
                samples.append(decode(y[0].tolist()))
    return samples


def test_nanogpt_train_resume_and_sample_run_on_gptfast(shakespeare_char):
    torch.manual_seed(1337)
    model, log = nanogpt_train(shakespeare_char, max_iters=20)
    assert model.config.vocab_size == len(CHARS) and model.config.bias is False
    evals = [entry for entry in log if entry[0] == "eval"]
    assert evals[-1][2] < 0.85 * evals[0][2], f"train loss should fall: {evals}"
    mfus = [entry[3] for entry in log if entry[0] == "iter" and entry[1] >= 5]
    assert mfus and all(isinstance(m, float) and 0 < m < 1 for m in mfus)

    resumed, resumed_log = nanogpt_train(shakespeare_char, init_from="resume", max_iters=22)
    assert resumed_log[0][:2] == ("eval", 20), "resumed at the saved iter_num"
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert p.shape == q.shape

    samples = nanogpt_sample(shakespeare_char)
    assert len(samples) == 2 and all(len(s) == 21 and set(s) <= set(CHARS) for s in samples)


def test_nanogpt_finetunes_gpt2_with_a_cropped_context(shakespeare_char, monkeypatch):
    """init_from="gpt2": from_pretrained(model_type, override_args), then crop_block_size."""
    transformers = pytest.importorskip("transformers")
    hub_dir = shakespeare_char / "hub"
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                     vocab_size=len(CHARS), bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hub_dir)
    monkeypatch.setattr(gptfast.model, "_download_hf_gpt2", lambda name: str(hub_dir))
    monkeypatch.chdir(shakespeare_char)
    model, log = nanogpt_train(shakespeare_char, init_from="gpt2", max_iters=3, block_size=16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    assert model.config.bias is True  # GPT-2's, from the checkpoint


def test_crop_block_size_keeps_the_first_positions_and_rejects_growth():
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    wpe = model.transformer.wpe.weight.detach().clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    torch.testing.assert_close(model.transformer.wpe.weight.detach(), wpe[:8])
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds"):
        model.crop_block_size(9)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
