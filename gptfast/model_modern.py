"""Today's GPT-2-class model, as nanochat and the modded-nanogpt speedrun build it, on gptfast's ops.

``GPT(config)`` returns a :class:`ModernGPT` when the config takes any of today's choices
(``GPTConfig.is_modern``; the presets "nanochat-d12/d20/d26" take them all). A block is
``x = x + attn(norm(x)); x = x + mlp(norm(x))`` with, per config field:

- ``norm``: parameter-free RMSNorm (``gptfast.rms_norm``) or LayerNorm; each residual add is
  fused into the norm that reads its result (``add_rms_norm`` / ``add_layer_norm``);
- ``position="rotary"``: no position embeddings; q and k are rotated as nanochat does (by
  -theta, i.e. ``gptfast.rotary_qk_norm`` with ``-sin``), RMS-normed per head and scaled by
  ``qk_scale`` in one op when ``qk_norm``;
- separate ``c_q``, ``c_k``, ``c_v`` (nanochat's names; Muon orthogonalises each), GQA with
  ``n_kv_head``, per-layer windows from ``window_pattern`` (``gptfast.causal_attention``);
- ``mlp="relu2"``: relu(x)^2; untied head; ``logit_softcap``: the training loss is
  ``gptfast.linear_cross_entropy(..., softcap=c)``, which never holds the logits;
- ``dropout`` after the embedding and on each branch's output (no attention dropout).

Weights start as nanochat's ``init_weights`` (karpathy/nanochat 92d63d4, nanochat/gpt.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, reference
from .model import GPT, GPTConfig
from .nn import KVCache, LayerNorm

__all__ = ["ModernGPT", "rotary_tables"]


def rotary_tables(length: int, head_dim: int, base: float, dtype=torch.float32) -> tuple:
    """cos, sin (length, head_dim / 2): angle t / base^(2i / head_dim) at position t, computed
    in ``dtype`` (fp32 by default, as nanochat). With fp32 tables cos^2 + sin^2 is 1 only to
    fp32's precision, so nanochat's rotate-then-norm and rotary_qk_norm's norm-then-rotate
    differ by ~1e-7 relative, far below bf16's resolution."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=dtype), inv_freq)
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm over the last dim, torch's default eps (nanochat's ``norm``)."""

    def forward(self, x):
        return functional.rms_norm(x)

    def add_and_norm(self, x, residual):
        return functional.add_rms_norm(x, residual)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm()
    return LayerNorm(config.n_embd, bias=config.bias)


class Attention(nn.Module):
    """Causal self-attention with GQA, rotary positions, QK-norm and a window (None: unlimited)."""

    def __init__(self, config: GPTConfig, window: Optional[int]):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.qk_norm, self.qk_scale = config.qk_norm, config.qk_scale
        self.window = window
        kv_width = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, kv_width, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary=None, kv_cache: Optional[KVCache] = None, document_ids=None):
        batch, seq, width = x.shape
        q = self.c_q(x).view(batch, seq, self.n_head, self.head_dim)
        k = self.c_k(x).view(batch, seq, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(batch, seq, self.n_kv_head, self.head_dim)
        q, k = self._rotate_and_norm(q, k, rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        cached = 0
        if kv_cache is not None:
            k, v, document_ids, cached = kv_cache.extend(k, v, document_ids)
        y = self._attend(q, k, v, cached, document_ids)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, seq, width)))

    def _rotate_and_norm(self, q, k, rotary):
        """q, k (B, T, heads, D) rotated by -theta (nanochat's convention: the HF rotation with
        -sin), RMS-normed and scaled when qk_norm."""
        if rotary is not None and self.qk_norm:
            cos, sin = rotary
            return functional.rotary_qk_norm(q, k, cos, -sin, scale=self.qk_scale)
        if rotary is not None:
            cos, sin = rotary
            return (reference.rotary(q, cos, -sin).to(q.dtype),
                    reference.rotary(k, cos, -sin).to(k.dtype))
        if self.qk_norm:
            return functional.rms_norm(q) * self.qk_scale, functional.rms_norm(k) * self.qk_scale
        return q, k

    def _attend(self, q, k, v, cached: int, document_ids):
        if cached == 0:
            return functional.causal_attention(q, k, v, document_ids=document_ids, window=self.window)
        # generation: the new queries sit at positions cached.. and see the cached keys too
        visible = reference.attention_mask(q.shape[-2], k.shape[-2], document_ids, self.window,
                                           device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                              enable_gqa=self.n_kv_head != self.n_head)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.relu2 = config.mlp == "relu2"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """``x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))``, the stream passed as (x, pending)
    meaning x + pending, as in :class:`gptfast.model.Block`, so each add fuses into a norm."""

    def __init__(self, config: GPTConfig, window: Optional[int]):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = Attention(config, window)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, pending, rotary, kv_cache=None, document_ids=None):
        h, x = (self.norm_1(x), x) if pending is None else self.norm_1.add_and_norm(pending, x)
        h, x = self.norm_2.add_and_norm(self.attn(h, rotary, kv_cache, document_ids), x)
        return x, self.mlp(h)


class ModernGPT(GPT):
    """The GPT of a config with today's choices; :class:`GPT` gives generation (KV cache),
    the loss (:meth:`GPT.fused_loss`, soft-capped) and loading."""

    def __init__(self, config: GPTConfig):
        nn.Module.__init__(self)
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.embedding_norm:
            layers["norm_e"] = make_norm(config)
        layers.update(drop=nn.Dropout(config.dropout),
                      h=nn.ModuleList([Block(config, w) for w in config.layer_windows()]),
                      norm_f=make_norm(config))
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if config.position == "rotary":
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head,
                                     config.rotary_base)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: q, k, v uniform with std 1/sqrt(n_embd), c_fc at 0.4 of that, both
        output projections zero, wte normal std 0.8, lm_head std 0.001 (a tied matrix: GPT-2's
        std 0.02), biases zero, norm weights one."""
        bound = math.sqrt(3.0 / self.config.n_embd)  # uniform(-b, b) has std b / sqrt(3)
        if self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        else:
            nn.init.normal_(self.transformer.wte.weight, std=0.8)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        if "wpe" in self.transformer:
            nn.init.normal_(self.transformer.wpe.weight, std=0.02)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNorm):
                module.reset_parameters()

    def hidden_states(self, idx, kv_caches: Optional[list] = None, document_ids=None):
        """The final hidden states (B, T, n_embd), after the last norm; as :meth:`GPT.hidden_states`."""
        start = self._start_position(idx, kv_caches)
        end = start + idx.size(1)
        document_ids = self._document_ids(idx, kv_caches, document_ids)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, end, device=idx.device))
        if "norm_e" in self.transformer:
            x = self.transformer.norm_e(x)
        x = self.transformer.drop(x)
        rotary = None
        if self.config.position == "rotary":
            rotary = (self.rotary_cos[start:end], self.rotary_sin[start:end])
        pending = None
        for i, block in enumerate(self.transformer.h):
            x, pending = block(x, pending, rotary, None if kv_caches is None else kv_caches[i],
                               document_ids)
        return self.transformer.norm_f.add_and_norm(pending, x)[0]

    def num_params(self, non_embedding=True):
        """Number of parameters (tied weights once); non_embedding leaves out the lookups: the
        position embeddings and an untied token embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """nanochat's estimate_flops: 6 per weight of every matmul (the Linear layers, lm_head
        included) plus 12 * n_head * head_dim * min(window, T) for each layer's attention."""
        T = self.config.block_size if T is None else T
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        per_key = 12 * cfg.n_head * (cfg.n_embd // cfg.n_head)
        return 6 * matmul + sum(per_key * (T if w is None else min(w, T))
                                for w in cfg.layer_windows())

    def crop_block_size(self, block_size):
        """Shrink the context to ``block_size``, keeping each layer's window."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} exceeds the model's {self.config.block_size}")
        short = self.config.short_window_size if self.config.window_pattern else self.config.short_window
        self.config = dataclasses.replace(self.config, block_size=block_size, short_window=short)
        if "wpe" in self.transformer:
            wpe = self.transformer.wpe
            wpe.weight = nn.Parameter(wpe.weight.detach()[:block_size].clone())
            wpe.num_embeddings = block_size
        if self.config.position == "rotary":
            self.rotary_cos = self.rotary_cos[:block_size].clone()
            self.rotary_sin = self.rotary_sin[:block_size].clone()
