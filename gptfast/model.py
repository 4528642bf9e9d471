"""A GPT in the shape of nanoGPT's model.py, running on gptfast's ops.

Parameter names are nanoGPT's (and, up to the transposed Conv1D weights, Hugging Face
GPT-2's), so nanoGPT checkpoints and local Hugging Face GPT-2 directories load as they are
(:meth:`GPT.from_pretrained`). Differences from nanoGPT, none of which changes the math of a
block: each residual add is fused into the LayerNorm that follows it
(``gptfast.add_layer_norm``); the MLP uses GPT-2's tanh GELU (nanoGPT uses the exact erf GELU,
so its models were trained with a slightly different activation); :meth:`GPT.generate` keeps a
KV cache.

This module holds the model (MLP, Block, GPT: forward, generation, accounting, loading) and
is the import path of all of it; its pieces live beside it, one job each, re-exported here:
:mod:`gptfast.config` (GPTConfig and the presets), :mod:`gptfast.pretrained` (reading Hugging
Face GPT-2 and nanoGPT checkpoints) and :mod:`gptfast.flops` (GPU peak FLOP/s for MFU). The
modern architecture is :mod:`gptfast.model_modern`, a GPT subclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .config import (ATTENTION_KINDS, MLP_ACTIVATIONS, MODERN_DEFAULTS, NANOCHAT_HEAD_DIM,  # noqa: F401
                     NORMS, POSITIONS, PRESET_NAMES, _PRESETS, GPTConfig)
from .flops import A100_BF16_FLOPS, PEAK_BF16_FLOPS, device_peak_flops, peak_flops_for_name  # noqa: F401
from .nn import CausalSelfAttention, KVCache, LayerNorm
# GPT.from_pretrained looks these up here, so patching gptfast.model._download_hf_gpt2 (the
# tests do, to stand in for the hub) still takes effect
from .pretrained import (_download_hf_gpt2, _dropout_override, _load_checked, _read_hf_gpt2,  # noqa: F401
                         _read_nanogpt)

__all__ = ["GPTConfig", "GPT", "PEAK_BF16_FLOPS", "peak_flops_for_name", "device_peak_flops"]


# ----------------------------------------------------------------------------- model --

class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm block: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.

    Each residual add is fused into the LayerNorm that reads its result, so the stream is
    passed as a pair ``(x, pending)`` meaning ``x + pending``: the block returns its MLP output
    un-added, and the next block's ln_1 (or the final ln_f) adds it.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, bias=config.bias,
                                        dropout=config.dropout, window=config.window)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pending=None, kv_cache: Optional[KVCache] = None, document_ids=None):
        h, x = (self.ln_1(x), x) if pending is None else self.ln_1.add_and_norm(pending, x)
        h, x = self.ln_2.add_and_norm(self.attn(h, kv_cache, document_ids), x)
        return x, self.mlp(h)


# The modern architecture is a subclass defined on top of this module ("module:class", as
# gptfast.functional names its kernels): imported by name when a config asks for it, so this
# module never imports the module that imports it.
MODERN_GPT = "gptfast.model_modern:ModernGPT"


def _modern_gpt_class():
    module_name, _, name = MODERN_GPT.partition(":")
    return getattr(importlib.import_module(module_name), name)


class GPT(nn.Module):
    """GPT-2's architecture (nanoGPT's names). ``GPT(config)`` of a config with any of today's
    choices (:attr:`GPTConfig.is_modern`) builds :class:`gptfast.model_modern.ModernGPT`, a
    subclass sharing generation, accounting and loading."""

    def __new__(cls, config=None, *args, **kwargs):
        if cls is GPT and isinstance(config, GPTConfig) and config.is_modern:
            cls = _modern_gpt_class()
        return super().__new__(cls)

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2

        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------ forward --

    def forward(self, idx, targets=None, return_logits=True, document_ids=None):
        """(logits, loss), as nanoGPT.

        ``document_ids`` (B, T), non-decreasing: attend within documents (see
        ``gptfast.causal_attention``); by default None, or with ``attention="document"``
        derived from idx (:meth:`document_ids_of`).

        With ``targets`` (B, T): logits (B, T, V) and the mean cross-entropy, positions whose
        target is -1 ignored. With ``return_logits=False`` the loss comes from the fused
        ``gptfast.linear_cross_entropy``, which never holds the (B*T, V) logits, and logits is
        None. Without targets: the logits of the last position only, (B, 1, V), and None.
        Logits are :meth:`logits`' (soft-capped, in fp32 or wider, with ``logit_softcap``).
        """
        x = self.hidden_states(idx, document_ids=document_ids)
        if targets is None:
            return self.logits(x[:, [-1], :]), None
        if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
            raise ValueError(
                f"targets must be a tensor of idx's shape {tuple(idx.shape)}, got "
                f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}"
            )
        if return_logits:
            logits = self.logits(x)
            rows, flat_targets = logits.view(-1, logits.size(-1)), targets.view(-1)
            # the logits are returned: the Triton loss must not write its gradient into them
            loss = functional.cross_entropy(rows, flat_targets, ignore_index=-1, keep_logits=True)
            return logits, loss
        return None, self.fused_loss(x, targets)

    def logits(self, x):
        """lm_head(x), soft-capped (c * tanh(logits / c)) in fp32 or wider when ``logit_softcap``
        is c, as nanochat caps its bf16 logits in fp32."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap is None:
            return logits
        return cap * torch.tanh(logits.to(torch.promote_types(logits.dtype, torch.float32)) / cap)

    def fused_loss(self, x, targets):
        """Mean cross-entropy of the logits of hidden states x (B, T, C) against targets (B, T)
        (-1 ignored), soft-capped as :meth:`logits`, by ``gptfast.linear_cross_entropy``: the
        (B*T, V) logits are never held (on the Triton backend)."""
        x, weight = _autocast_inputs(x, self.lm_head.weight)
        return functional.linear_cross_entropy(x.reshape(-1, x.size(-1)), weight,
                                               targets.reshape(-1), ignore_index=-1,
                                               softcap=self.config.logit_softcap)

    def hidden_states(self, idx, kv_caches: Optional[list] = None, document_ids=None):
        """The final hidden states (B, T, n_embd), after ln_f, of tokens idx (B, T).

        With ``kv_caches`` (one :class:`KVCache` per block, all holding the same number of
        tokens), idx continues the cached sequence: its positions start at the cached length,
        and ``document_ids`` (given or derived) are those of the new tokens.
        """
        start = self._start_position(idx, kv_caches)
        end = start + idx.size(1)
        document_ids = self._document_ids(idx, kv_caches, document_ids)
        pos = torch.arange(start, end, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        pending = None
        for i, block in enumerate(self.transformer.h):
            x, pending = block(x, pending, None if kv_caches is None else kv_caches[i],
                               document_ids)
        return self.transformer.ln_f.add_and_norm(pending, x)[0]

    def _start_position(self, idx, kv_caches) -> int:
        """The position of idx's first token (the cached length), after checking idx and the caches."""
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() \
                or idx.dtype == torch.bool:
            raise TypeError(
                "idx must be an integer tensor of token ids, got "
                f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}"
            )
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (batch, seq) with seq >= 1, got shape {tuple(idx.shape)}")
        if kv_caches is not None and len(kv_caches) != len(self.transformer.h):
            raise ValueError(f"kv_caches must hold one KVCache per block ({len(self.transformer.h)}), "
                             f"got {len(kv_caches)}")
        start = 0 if kv_caches is None else kv_caches[0].length
        end = start + idx.size(1)
        if end > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {end}: block_size is only "
                f"{self.config.block_size}"
            )
        return start

    def document_ids_of(self, idx):
        """Document ids (B, T) of tokens idx: ``cumsum(idx == eot_token)`` along T, so each
        ``eot_token`` starts a new document (it is the first input of the next one)."""
        return torch.cumsum(idx == self.config.eot_token, dim=1)

    def _document_ids(self, idx, kv_caches, document_ids):
        """The document ids of idx's tokens: given, derived ("document"), or None ("causal")."""
        if document_ids is not None:
            if not isinstance(document_ids, torch.Tensor) or document_ids.shape != idx.shape:
                raise ValueError(
                    f"document_ids must be a tensor of idx's shape {tuple(idx.shape)}, got "
                    f"{getattr(document_ids, 'shape', type(document_ids).__name__)}"
                )
            return document_ids
        if self.config.attention != "document":
            return None
        ids = self.document_ids_of(idx)
        last = None if kv_caches is None else kv_caches[0].last_document_id()
        return ids if last is None else ids + last[:, None]

    # --------------------------------------------------------------------- generation --

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append ``max_new_tokens`` sampled tokens to idx (B, T) and return the (B, T + new) ids.

        temperature 0 picks the argmax (greedy); top_k keeps the k most likely tokens (clamped
        to the vocabulary). As in nanoGPT, the model sees only the last block_size tokens.
        With ``use_cache`` the prompt is prefilled once and each new token costs one position;
        when the sequence outgrows block_size the cache is dropped and the last block_size
        tokens are prefilled again (positions must stay below block_size), which gives exactly
        the tokens of the ``use_cache=False`` loop, at its cost from then on. With
        ``attention="document"`` or a ``window`` the cached steps apply the same masks: each new
        token sees only its own document (a sampled ``eot_token`` starts a new one) and the
        last ``window`` positions.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError("idx must be a (batch, seq) tensor of token ids with seq >= 1")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")

        block_size = self.config.block_size
        caches = [KVCache(block_size) for _ in self.transformer.h] if use_cache else None
        uncached = idx[:, -block_size:]  # tokens whose keys are not in the cache yet
        for _ in range(max_new_tokens):
            if caches is None:
                x = self.hidden_states(idx[:, -block_size:])
            else:
                if caches[0].length + uncached.size(1) > block_size:
                    for cache in caches:
                        cache.reset()
                    uncached = idx[:, -block_size:]
                x = self.hidden_states(uncached, caches)
            logits = self.logits(x[:, -1, :])
            next_token = _sample(logits, temperature, top_k)
            idx = torch.cat((idx, next_token), dim=1)
            uncached = next_token
        return idx

    # ------------------------------------------------------------------ accounting --

    def num_params(self, non_embedding=True):
        """Number of parameters (tied weights once). As nanoGPT, non_embedding leaves out the
        position embeddings; the token embeddings stay in, being the lm_head's weights."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def get_num_params(self, non_embedding=True):
        """nanoGPT's name for :meth:`num_params`."""
        return self.num_params(non_embedding)

    def flops_per_token(self, T=None):
        """Training FLOPs per token at context T (default block_size), nanoGPT's estimate_mfu
        count (PaLM appendix B): ``6 * N + 12 * L * H * D * T``, N = ``num_params()`` (non-embedding).

        The attention term is nanoGPT's whatever the mask: it counts every query against all T
        keys (no halving for causality, no shrinking for ``attention="document"`` or a
        ``window``), so MFU is one yardstick across masks, not the work a masked run did."""
        T = self.config.block_size if T is None else T
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def mfu(self, tokens_per_second, T=None, device=None):
        """Model FLOPs utilisation on this GPU: achieved training FLOP/s over its dense bf16 peak.

        ``device`` defaults to the current CUDA device; returns None on CPU or on a GPU that
        is not in :data:`PEAK_BF16_FLOPS`.
        """
        peak = device_peak_flops(device)
        if peak is None:
            return None
        return self.flops_per_token(T) * tokens_per_second / peak

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        """nanoGPT's estimate_mfu: ``fwdbwd_per_iter`` sequences of block_size tokens in ``dt``
        seconds, as a fraction of an A100's bf16 peak (312 TFLOP/s), whatever the device.
        :meth:`mfu` measures against the GPU actually in use."""
        tokens_per_second = fwdbwd_per_iter * self.config.block_size / dt
        return self.flops_per_token() * tokens_per_second / A100_BF16_FLOPS

    def crop_block_size(self, block_size):
        """nanoGPT's crop_block_size: shrink the context to ``block_size`` (e.g. after loading
        GPT-2's 1024 positions to train at 256), keeping the first position embeddings."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} exceeds the model's {self.config.block_size}")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight.detach()[:block_size].clone())
        wpe.num_embeddings = block_size

    # --------------------------------------------------------------------- training --

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW as nanoGPT: weight decay on matrices and embeddings (dim >= 2), none on biases
        and LayerNorm weights; the fused implementation on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

    # ------------------------------------------------------------------- loading --

    @classmethod
    def from_pretrained(cls, path, dropout=0.0):
        """Load a checkpoint on the CPU (transformers not needed).

        ``path`` is one of:
        - a Hugging Face GPT-2 directory: config.json and model.safetensors (or a sharded
          model.safetensors.index.json, or pytorch_model.bin), e.g. from
          ``huggingface-cli download gpt2 --local-dir gpt2``;
        - a nanoGPT checkpoint file (``ckpt.pt`` with "model" and "model_args"), or a directory
          holding ckpt.pt. ``_orig_mod.`` prefixes (torch.compile) are stripped;
        - as nanoGPT's ``from_pretrained(model_type, override_args)``: "gpt2", "gpt2-medium",
          "gpt2-large" or "gpt2-xl" when no such local path exists, fetched from the Hugging
          Face hub (huggingface_hub's cache; needs the network the first time).
        ``dropout`` overrides the checkpoint's dropout, as nanoGPT does (default 0); nanoGPT's
        ``override_args`` dict (``{"dropout": p}``, its only allowed key) works in its place.
        """
        dropout = _dropout_override(dropout)
        if isinstance(path, str) and path in _PRESETS and not os.path.exists(path):
            path = _download_hf_gpt2(path)
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"GPT.from_pretrained: {path!r} is neither a local path nor one of the hub's "
                f"GPT-2 names ({', '.join(_PRESETS)}). For a local copy of Hugging Face GPT-2 "
                "weights run e.g. `huggingface-cli download gpt2 --local-dir ./gpt2` and pass ./gpt2"
            )
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            config, state = _read_hf_gpt2(path)
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "ckpt.pt")):
            config, state = _read_nanogpt(os.path.join(path, "ckpt.pt"))
        elif os.path.isfile(path):
            config, state = _read_nanogpt(path)
        else:
            raise FileNotFoundError(
                f"{path!r} holds neither config.json (a Hugging Face GPT-2 directory) nor ckpt.pt "
                "(a nanoGPT checkpoint)"
            )
        model = cls(dataclasses.replace(config, dropout=dropout))
        _load_checked(model, state, path)
        return model


def _autocast_inputs(x, weight):
    """Cast x and weight to the autocast dtype when autocast is on, as F.linear would be."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), weight.to(dtype)
    return x, weight


def _sample(logits, temperature, top_k):
    """One token id per row of logits (B, V): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
