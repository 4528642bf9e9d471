"""Checkpoints for :meth:`gptfast.model.GPT.from_pretrained`: a local Hugging Face GPT-2
directory (safetensors, sharded safetensors or pytorch_model.bin; Conv1D weights transposed), a
hub download of one, or a nanoGPT ``ckpt.pt``, read on the CPU into a :class:`GPTConfig` and a
state_dict with GPT's keys, which are checked (names and shapes) before loading."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from .config import GPTConfig
from .extras import optional_import

def _dropout_override(dropout) -> float:
    """``dropout`` as a number, or nanoGPT's override_args dict {"dropout": p} (or None/{})."""
    if dropout is None:
        return 0.0
    if isinstance(dropout, dict):
        unknown = sorted(set(dropout) - {"dropout"})
        if unknown:
            raise ValueError(f"override_args may only override 'dropout' (as nanoGPT), got {unknown}")
        return dropout.get("dropout", 0.0)
    return dropout


def _download_hf_gpt2(model_type: str) -> str:
    """A local directory with the hub's ``model_type`` GPT-2 (config.json + weights)."""
    with optional_import("huggingface_hub", f"downloading {model_type!r} from the Hugging Face "
                         "hub (GPT.from_pretrained of a name, not of a local directory)"):
        from huggingface_hub import snapshot_download
    return snapshot_download(model_type, allow_patterns=["config.json", "model.safetensors",
                                                         "pytorch_model.bin"])


_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_SUPPORTED_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def _is_attention_mask_buffer(key):
    # HF's attn.bias / attn.masked_bias and nanoGPT's (non-flash) attn.bias are causal masks
    return key.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"])


def _read_hf_gpt2(directory):
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{directory}: model_type is {hf.get('model_type')!r}, only gpt2 loads")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _SUPPORTED_HF_ACTIVATIONS:
        raise ValueError(f"{directory}: activation_function {activation!r} is not supported "
                         f"(GPT uses the tanh GELU: {_SUPPORTED_HF_ACTIVATIONS})")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(f"{directory}: layer_norm_epsilon {hf['layer_norm_epsilon']} is not 1e-5")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{directory}: n_inner {hf['n_inner']} is not 4 * n_embd")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        raise ValueError(f"{directory}: only GPT-2's 1/sqrt(head_dim) attention scaling is supported")
    config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx")), vocab_size=hf["vocab_size"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)

    raw = _read_hf_weights(directory)
    state = {}
    for key, tensor in raw.items():
        if _is_attention_mask_buffer(key):
            continue
        # checkpoints saved from GPT2Model (the hub's gpt2) have no "transformer." prefix
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key
        state[key] = tensor.t() if key.endswith(_CONV1D_WEIGHTS) else tensor
    head, embedding = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ValueError(f"{directory}: lm_head.weight differs from transformer.wte.weight; "
                         "GPT ties them and cannot load an untied head")
    if head is None and embedding is not None:
        state["lm_head.weight"] = embedding  # tied: saved once
    return config, state


def _read_hf_weights(directory):
    names = os.listdir(directory)
    if "model.safetensors" in names:
        with optional_import("safetensors", f"reading {directory}/model.safetensors"):
            from safetensors.torch import load_file
        return load_file(os.path.join(directory, "model.safetensors"))
    if "model.safetensors.index.json" in names:
        with optional_import("safetensors", f"reading {directory}'s sharded safetensors weights"):
            from safetensors.torch import load_file
        with open(os.path.join(directory, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return state
    if "pytorch_model.bin" in names:
        return torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu",
                          weights_only=True)
    raise FileNotFoundError(f"{directory} has config.json but no model.safetensors, "
                            "model.safetensors.index.json or pytorch_model.bin")


def _read_nanogpt(file):
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise ValueError(f"{file} is not a nanoGPT checkpoint (a dict with 'model' and 'model_args')")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(checkpoint["model_args"]) - known
    if unknown:
        raise ValueError(f"{file}: model_args has fields GPTConfig does not know: {sorted(unknown)}")
    config = GPTConfig(**checkpoint["model_args"])
    state = {}
    for key, tensor in checkpoint["model"].items():
        while key.startswith("_orig_mod."):
            key = key[len("_orig_mod."):]
        if not _is_attention_mask_buffer(key):
            state[key] = tensor
    return config, state


def _load_checked(model, state, source):
    """Copy state into model after checking that the keys and shapes match exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint keys do not match GPT's: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: checkpoint shapes do not match GPT's: {wrong[:10]}")
    model.load_state_dict(state, strict=True)
