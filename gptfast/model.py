"""A GPT in the shape of nanoGPT's model.py, running on gptfast's ops.

Parameter names are nanoGPT's (and, up to the transposed Conv1D weights, Hugging Face
GPT-2's), so nanoGPT checkpoints and local Hugging Face GPT-2 directories load as they are
(:meth:`GPT.from_pretrained`). Differences from nanoGPT, none of which changes the math of a
block: each residual add is fused into the LayerNorm that follows it
(``gptfast.add_layer_norm``); the MLP uses GPT-2's tanh GELU (nanoGPT uses the exact erf GELU,
so its models were trained with a slightly different activation); :meth:`GPT.generate` keeps a
KV cache.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .extras import optional_import
from .nn import CausalSelfAttention, KVCache, LayerNorm

__all__ = ["GPTConfig", "GPT", "PEAK_BF16_FLOPS", "peak_flops_for_name", "device_peak_flops"]

A100_BF16_FLOPS = 312e12  # the peak nanoGPT's estimate_mfu divides by, on every device


# --------------------------------------------------------------------------- config --

ATTENTION_KINDS = ("causal", "document")

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLP_ACTIVATIONS = ("gelu", "relu2")

# (n_layer, n_head, n_embd) of the four GPT-2 sizes
_PRESETS = {
    "gpt2": (12, 12, 768),          # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),   # 774M
    "gpt2-xl": (48, 25, 1600),      # 1558M
}

# nanochat's depth-d models (karpathy/nanochat at 92d63d4, scripts/base_train.py and
# nanochat/gpt.py): n_embd = 64 * d rounded up to a multiple of the head dim 128
# (--aspect-ratio 64, --head-dim 128), n_head = n_embd / 128, n_kv_head = n_head,
# sequence_len 2048 (--max-seq-len), vocab 32768 (scripts/tok_train.py, 2**15),
# window_pattern "SSSL" with the last layer always long, rotary base 100000, q and k
# RMS-normed and scaled by 1.2, ReLU^2 MLP, untied head, no biases, softcap 15, RMSNorm
# after the embedding. Not modelled here: its value embeddings, smear, backout and the
# per-layer residual scalars (resid_lambdas, x0_lambdas).
_NANOCHAT_DEPTHS = {"nanochat-d12": 12, "nanochat-d20": 20, "nanochat-d26": 26}
NANOCHAT_HEAD_DIM = 128


def _nanochat_fields(depth: int) -> dict:
    n_embd = -(-depth * 64 // NANOCHAT_HEAD_DIM) * NANOCHAT_HEAD_DIM
    return dict(block_size=2048, vocab_size=32768, n_layer=depth, n_head=n_embd // NANOCHAT_HEAD_DIM,
                n_embd=n_embd, bias=False, norm="rmsnorm", position="rotary", rotary_base=100000.0,
                mlp="relu2", qk_norm=True, qk_scale=1.2, tie_embeddings=False,
                window_pattern="SSSL", logit_softcap=15.0, embedding_norm=True)


PRESET_NAMES = (*_PRESETS, *_NANOCHAT_DEPTHS)

# GPTConfig fields beyond GPT-2's block, with the value that keeps GPT-2's choice
MODERN_DEFAULTS = dict(norm="layernorm", position="learned", rotary_base=10000.0, mlp="gelu",
                       qk_norm=False, qk_scale=1.0, tie_embeddings=True, n_kv_head=None,
                       window_pattern=None, short_window=None, logit_softcap=None,
                       embedding_norm=False)


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be {'None or ' if allow_none else ''}a positive "
                         f"int, got {value!r}")


def _positive_number(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"GPTConfig.{name} must be {'None or ' if allow_none else ''}a finite "
                         f"number > 0, got {value!r}")


@dataclasses.dataclass
class GPTConfig:
    """nanoGPT's GPTConfig. The default vocab_size 50304 is GPT-2's 50257 padded up to a
    multiple of 64 (faster matmuls); the presets use 50257, the vocabulary of the released
    GPT-2 weights.

    Attention masks (``gptfast.causal_attention``): ``attention="causal"`` lets every token
    see all earlier ones (nanoGPT); ``"document"`` keeps each token within its document, the
    model deriving document ids from its input tokens: a new document begins at each
    ``eot_token`` (GPT-2's ``<|endoftext|>``, 50256), which is the first input of the document
    it precedes. ``window`` (int >= 1) further limits each token to the last ``window``
    positions, itself included.

    Today's choices (nanochat, modded-nanogpt), each defaulting to GPT-2's:
    ``norm`` "layernorm" or "rmsnorm" (parameter-free, as nanochat); ``position`` "learned"
    or "rotary" (``rotary_base``); ``mlp`` "gelu" (tanh) or "relu2" (ReLU squared);
    ``qk_norm`` RMS-normalises q and k per head, times ``qk_scale``; ``tie_embeddings``;
    ``n_kv_head`` (grouped-query attention, None = n_head); ``window_pattern`` a string of
    S/L tiled over the layers, the last layer always L: S layers see ``short_window`` earlier
    tokens (flash-attention's window_left; None: nanochat's rule, a quarter of block_size
    rounded up to a multiple of 128), L layers ``window`` (None: all); ``logit_softcap`` c
    gives logits c * tanh(logits / c); ``embedding_norm`` normalises the embeddings before
    the first block. Any of them away from GPT-2's value makes ``GPT(config)`` the modern
    model of :mod:`gptfast.model_modern`.
    """

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "causal"
    window: Optional[int] = None
    eot_token: int = 50256
    norm: str = "layernorm"
    position: str = "learned"
    rotary_base: float = 10000.0
    mlp: str = "gelu"
    qk_norm: bool = False
    qk_scale: float = 1.0
    tie_embeddings: bool = True
    n_kv_head: Optional[int] = None
    window_pattern: Optional[str] = None
    short_window: Optional[int] = None
    logit_softcap: Optional[float] = None
    embedding_norm: bool = False

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False, got {self.bias!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"GPTConfig.attention must be one of {ATTENTION_KINDS}, "
                             f"got {self.attention!r}")
        if self.window is not None and (isinstance(self.window, bool)
                                        or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"GPTConfig.window must be None or an int >= 1, got {self.window!r}")
        if isinstance(self.eot_token, bool) or not isinstance(self.eot_token, int) \
                or self.eot_token < 0:
            raise ValueError(f"GPTConfig.eot_token must be an int >= 0, got {self.eot_token!r}")
        if self.attention == "document" and self.eot_token >= self.vocab_size:
            raise ValueError(f"GPTConfig.eot_token ({self.eot_token}) must be a token id below "
                             f"vocab_size ({self.vocab_size}) when attention='document'")
        self._check_modern()

    def _check_modern(self):
        for name, value, choices in (("norm", self.norm, NORMS), ("position", self.position, POSITIONS),
                                     ("mlp", self.mlp, MLP_ACTIVATIONS)):
            if value not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {choices}, got {value!r}")
        for name in ("qk_norm", "tie_embeddings", "embedding_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _positive_number("rotary_base", self.rotary_base)
        _positive_number("qk_scale", self.qk_scale)
        _positive_number("logit_softcap", self.logit_softcap, allow_none=True)
        _positive_int("n_kv_head", self.n_kv_head, allow_none=True)
        _positive_int("short_window", self.short_window, allow_none=True)
        if self.qk_scale != 1.0 and not self.qk_norm:
            raise ValueError("GPTConfig.qk_scale scales the normalised q and k: it needs qk_norm=True")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.kv_heads})")
        if self.position == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: rotary positions need an even head dim, got "
                             f"{self.n_embd // self.n_head}")
        pattern = self.window_pattern
        if pattern is not None and (not isinstance(pattern, str) or not pattern
                                    or set(pattern.upper()) - set("SL")):
            raise ValueError(f"GPTConfig.window_pattern must be None or a string of S and L, got "
                             f"{pattern!r}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def is_modern(self) -> bool:
        """Whether any of today's choices differs from GPT-2's (then GPT builds the modern model)."""
        return any(getattr(self, name) != value for name, value in MODERN_DEFAULTS.items()
                   if name not in ("n_kv_head", "rotary_base", "short_window")) \
            or self.kv_heads != self.n_head

    @property
    def short_window_size(self) -> int:
        """Earlier tokens an S layer sees: short_window, or nanochat's rule for None (a quarter
        of block_size rounded up to a multiple of 128, FA3's key tile: 512 at 2048)."""
        if self.short_window is not None:
            return self.short_window
        return -(-self.block_size // 4 // 128) * 128

    def layer_windows(self) -> list:
        """The attention window of each layer (``gptfast.causal_attention``'s: query i sees keys
        i - w < j <= i; None = unlimited): ``window`` everywhere without a window_pattern."""
        if self.window_pattern is None:
            return [self.window] * self.n_layer
        short = self.short_window_size
        pattern = self.window_pattern.upper()
        kinds = [pattern[i % len(pattern)] for i in range(self.n_layer)]
        kinds[-1] = "L"
        # short_window counts the earlier keys (window_left); causal_attention's counts itself too
        return [short + 1 if kind == "S" else self.window for kind in kinds]

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named architecture with any field overridden, e.g. ``vocab_size=50304``:
        - "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl": the GPT-2 sizes (block_size 1024,
          vocab_size 50257, bias);
        - "nanochat-d12", "nanochat-d20", "nanochat-d26": nanochat's depth-d models (see
          ``_nanochat_fields``: n_embd 768/1280/1664, head dim 128, block_size 2048, vocab 32768,
          rotary, RMSNorm, QK-norm, ReLU^2, untied, "SSSL" windows, softcap 15).
        """
        if name in _NANOCHAT_DEPTHS:
            return cls(**{**_nanochat_fields(_NANOCHAT_DEPTHS[name]), **overrides})
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        n_layer, n_head, n_embd = _PRESETS[name]
        fields = dict(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, bias=True)
        return cls(**{**fields, **overrides})


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


# -------------------------------------------------------------------- checkpoints --

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


# ----------------------------------------------------------------------- device peak --

# Dense (no sparsity) bf16 tensor-core peak FLOP/s (fp16 for V100) by device name, most
# specific first: the first entry whose name appears as whole words in the CUDA device name
# wins ("H100 PCIe" before "H100", and "L4" does not match "L40S").
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,   # SXM, reported as e.g. "NVIDIA H100 80GB HBM3"
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def _name_pattern(key):
    words = r"[\s_-]+".join(re.escape(word) for word in key.split())
    # whole words only, and not a "Ti"/"Super" variant, which is a different product
    return re.compile(rf"(?<![a-z0-9]){words}(?![a-z0-9])(?![\s_-]*(?:ti|super)\b)", re.IGNORECASE)


_PEAK_PATTERNS = [(_name_pattern(key), flops) for key, flops in PEAK_BF16_FLOPS.items()]


def peak_flops_for_name(device_name: str) -> Optional[float]:
    """The dense bf16 peak FLOP/s of a GPU from its name (as torch.cuda.get_device_name
    reports it), or None when the GPU is not in :data:`PEAK_BF16_FLOPS`."""
    for pattern, flops in _PEAK_PATTERNS:
        if pattern.search(device_name):
            return flops
    return None


def device_peak_flops(device=None) -> Optional[float]:
    """The dense bf16 peak FLOP/s of ``device`` (default: the current CUDA device, if any).

    None for CPUs and other non-CUDA devices, and for GPUs not in :data:`PEAK_BF16_FLOPS`.
    """
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))
