"""Drop-in modules built on ``gptfast.functional``.

- :class:`LayerNorm`: a ``torch.nn.LayerNorm`` (same constructor, attributes and state_dict)
  whose forward is ``gptfast.layer_norm``; :meth:`LayerNorm.add_and_norm` fuses a residual add.
- :class:`CrossEntropyLoss` and :class:`LinearCrossEntropy`: ``gptfast.cross_entropy`` and the
  fused ``gptfast.linear_cross_entropy`` (never materialises N x V) as modules.
- :class:`CausalSelfAttention`: nanoGPT's attention (``c_attn``, ``c_proj``) with optional
  grouped-query heads and a :class:`KVCache` for generation.

``patch(model)``, which makes other models (nanoGPT, Hugging Face, nanochat) run on these ops,
is :mod:`gptfast.patching`; ``gptfast.nn.patch`` and ``PatchReport`` still name it.

Every module runs wherever ``gptfast.functional`` runs: Triton kernels on CUDA, plain PyTorch
elsewhere (see ``gptfast.use_backend``).
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, reference

__all__ = [
    "LayerNorm", "CrossEntropyLoss", "LinearCrossEntropy", "CausalSelfAttention", "KVCache",
    "PatchReport", "patch", "hf_attention",
]


# -------------------------------------------------------------------------- LayerNorm --

class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dim, computed by ``gptfast.layer_norm``.

    Same arguments, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``) and
    state_dict keys (``weight``, ``bias``) as torch's, so torch LayerNorm weights load as is.
    Only last-dim normalisation is supported: a ``normalized_shape`` of more than one dim
    raises ValueError.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(
                "gptfast.nn.LayerNorm normalises over the last dim only: normalized_shape must "
                f"be an int or a 1-element shape, got {normalized_shape!r}"
            )
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.layer_norm(input, self.weight, self.bias, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor):
        """``(self(x + residual), x + residual)`` in one pass (``gptfast.add_layer_norm``)."""
        return functional.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


# ------------------------------------------------------------------------------ losses --

class CrossEntropyLoss(nn.Module):
    """``gptfast.cross_entropy`` as a module: ``loss = CrossEntropyLoss()(logits, target)``.

    logits are (..., V) with the classes in the last dim (unlike ``torch.nn.CrossEntropyLoss``,
    whose classes are dim 1 for inputs of more than 2 dims); target holds one index per row.
    ``z_loss`` adds ``z_loss * logsumexp(logits)^2`` per row (Liger's ``lse_square_scale``).
    ``weight`` (per-class weights, a buffer as in ``torch.nn.CrossEntropyLoss``), ``softcap``
    and ``return_z_loss`` are ``gptfast.cross_entropy``'s (Liger's names); with
    ``return_z_loss=True`` the module returns ``(loss, z_loss_term)``.

    As ``gptfast.cross_entropy``: ``keep_logits=False`` promises that nothing reads the
    logits after the loss, and lets the Triton backend write their gradient into them (O(N)
    extra memory instead of N x V); the default keeps them.
    """

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 keep_logits=True, *, weight=None, softcap=None, return_z_loss=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.keep_logits = keep_logits
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return functional.cross_entropy(logits, target, self.ignore_index, self.reduction,
                                        self.label_smoothing, self.z_loss, weight=self.weight,
                                        softcap=self.softcap, return_z_loss=self.return_z_loss,
                                        keep_logits=self.keep_logits)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, return_z_loss={self.return_z_loss}, "
                f"keep_logits={self.keep_logits}")


class LinearCrossEntropy(nn.Module):
    """An output projection fused with its loss: ``cross_entropy(x @ weight.T + bias, target)``.

    Holds ``weight`` (vocab_size, in_features) and an optional ``bias``, initialised like
    ``nn.Linear``; the N x V logits are never materialised where a kernel exists.
    ``ce_weight`` (per-class loss weights, a buffer), ``softcap`` and ``return_z_loss`` are
    ``gptfast.linear_cross_entropy``'s (Liger's names). The parameters may stay fp32 while x
    is bf16/fp16 (as under autocast).
    """

    def __init__(self, in_features, vocab_size, bias=False, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, device=None, dtype=None, *, ce_weight=None,
                 softcap=None, return_z_loss=False):
        super().__init__()
        self.in_features = in_features
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, in_features, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.empty(vocab_size, device=device, dtype=dtype))
                     if bias else None)
        self.register_buffer("ce_weight", ce_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.reset_parameters()

    def reset_parameters(self):
        # the nn.Linear initialisation, so a Linear's weights and this module's are interchangeable
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        return functional.linear_cross_entropy(x, self.weight, target, self.bias, self.ignore_index,
                                               self.reduction, self.label_smoothing, self.z_loss,
                                               ce_weight=self.ce_weight, softcap=self.softcap,
                                               return_z_loss=self.return_z_loss)

    def extra_repr(self):
        return (f"in_features={self.in_features}, vocab_size={self.vocab_size}, "
                f"bias={self.bias is not None}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, "
                f"return_z_loss={self.return_z_loss}")


# -------------------------------------------------------------------------- attention --

class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Buffers k, v of shape (B, Hkv, max_length, D) are allocated on the first :meth:`append`
    (taking batch, heads, head dim, dtype and device from the first keys) and reused after
    :meth:`reset`. ``length`` is the number of tokens held. For document-masked attention it
    also keeps each held token's document id (``append(k, v, document_ids)``).
    """

    def __init__(self, max_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.max_length = max_length
        self.length = 0
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.document_ids: Optional[torch.Tensor] = None  # (B, max_length) int64 when used

    def reset(self) -> None:
        """Forget every token (the buffers are kept for reuse)."""
        self.length = 0

    def extend(self, k, v, document_ids=None):
        """:meth:`append` for an attention layer: returns (all keys, all values, the ids of all
        held tokens or None, how many tokens were cached before this call)."""
        cached = self.length
        if document_ids is None:
            return (*self.append(k, v), None, cached)
        return (*self.append(k, v, document_ids), cached)

    def append(self, k: torch.Tensor, v: torch.Tensor, document_ids: Optional[torch.Tensor] = None):
        """Store k, v (B, Hkv, T, D) after the cached tokens; returns views of all keys and values.

        With ``document_ids`` (B, T) of the new tokens, it returns the ids of all held tokens
        as a third item (every append of a filled cache must then pass them).
        """
        batch, heads, new, head_dim = k.shape
        end = self.length + new
        if end > self.max_length:
            raise ValueError(
                f"KVCache overflow: {self.length} cached + {new} new tokens > max_length "
                f"{self.max_length}"
            )
        wanted = (batch, heads, self.max_length, head_dim)
        if self.k is None or self.k.shape != wanted or self.k.dtype != k.dtype or self.k.device != k.device:
            if self.length:
                raise ValueError(
                    f"keys of shape {tuple(k.shape)} ({k.dtype}) do not fit the cache holding "
                    f"{tuple(self.k.shape)} ({self.k.dtype}); reset() it first"
                )
            self.k = k.new_empty(wanted)
            self.v = v.new_empty(wanted)
        if document_ids is not None:
            if document_ids.shape != (batch, new):
                raise ValueError(f"document_ids must have shape {(batch, new)}, got "
                                 f"{tuple(document_ids.shape)}")
            held = self.document_ids
            if self.length and (held is None or held.shape[0] != batch):
                raise ValueError("document_ids given, but the cached tokens were stored without "
                                 "them; reset() the cache first")
            if held is None or held.shape[0] != batch or held.device != k.device:
                self.document_ids = held = torch.empty((batch, self.max_length),
                                                       dtype=torch.long, device=k.device)
            held[:, self.length:end] = document_ids
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        if document_ids is not None:
            return self.k[:, :, :end], self.v[:, :, :end], self.document_ids[:, :end]
        return self.k[:, :, :end], self.v[:, :, :end]

    def last_document_id(self) -> Optional[torch.Tensor]:
        """(B,) document id of the last held token, or None when none is held with ids."""
        if not self.length or self.document_ids is None:
            return None
        return self.document_ids[:, self.length - 1]


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D): query head h reads kv head h // groups."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class CausalSelfAttention(nn.Module):
    """nanoGPT's causal self-attention, with grouped-query heads and an optional KV cache.

    ``c_attn`` projects to [q | k | v] with ``n_head`` query heads and ``n_kv_head`` key/value
    heads (default ``n_head``: then ``c_attn`` is nanoGPT's (3 * n_embd, n_embd) layer and
    nanoGPT weights load as is); ``c_proj`` projects back. Attention runs in
    ``gptfast.causal_attention`` except in training with ``dropout > 0``, where SDPA applies
    the attention dropout (``attn_dropout.p``); ``resid_dropout`` follows ``c_proj`` as in nanoGPT.

    ``forward(x, kv_cache, document_ids)``: with an empty cache the call is an ordinary causal
    pass whose keys and values are stored; when the cache holds earlier tokens, the new queries
    attend to the cached and the new keys with the causal offset of the cached length.

    Masks, as ``gptfast.causal_attention``: ``window`` (int >= 1) lets a query see only the
    last ``window`` positions (itself included); ``document_ids`` (B, T) of the tokens of x,
    non-decreasing, keeps each query within its document. With a KV cache the ids are stored
    with the keys (pass them on every call), and the window counts absolute positions.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, bias: bool = True,
                 dropout: float = 0.0, window: Optional[int] = None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        for name, value in (("n_embd", n_embd), ("n_head", n_head), ("n_kv_head", n_kv_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.window = window
        self.head_dim = n_embd // n_head
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x must be (batch, seq, {self.n_embd}), got shape {tuple(x.shape)}")
        batch, seq, _ = x.shape
        if document_ids is not None and (not isinstance(document_ids, torch.Tensor)
                                         or document_ids.shape != (batch, seq)):
            raise ValueError(f"document_ids must be a (batch, seq) = {(batch, seq)} tensor, got "
                             f"{getattr(document_ids, 'shape', type(document_ids).__name__)}")
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)

        cached = 0
        if kv_cache is not None:
            k, v, document_ids, cached = kv_cache.extend(k, v, document_ids)
        y = self._attend(q, k, v, cached, document_ids)
        y = y.transpose(1, 2).contiguous().view(batch, seq, self.n_embd)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q, k, v, cached: int, document_ids=None) -> torch.Tensor:
        """q (B, H, T, D) for positions cached..cached+T-1; k, v (and document_ids, if given)
        hold positions 0..cached+T-1."""
        dropout_p = self.attn_dropout.p if self.training else 0.0
        masked = document_ids is not None or self.window is not None
        if cached == 0 and dropout_p == 0.0:
            if not masked:
                return functional.causal_attention(q, k, v)
            return functional.causal_attention(q, k, v, document_ids=document_ids,
                                               window=self.window)
        groups = self.n_head // self.n_kv_head
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if masked:
            visible = reference.attention_mask(q.shape[-2], k.shape[-2], document_ids, self.window,
                                               device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
        if cached == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        new = q.shape[-2]
        if new == 1:  # the one new token is the last position: it sees every key, no mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # query i sits at position cached + i and sees keys 0..cached + i
        visible = torch.ones(new, cached + new, dtype=torch.bool, device=q.device).tril(cached)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)

    def extra_repr(self):
        window = "" if self.window is None else f", window={self.window}"
        return f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}{window}"


# ----------------------------------------------------------- moved to gptfast.patching --

# patch() lives in gptfast.patching (which builds on these modules); these names stay
# importable from here, bound on first access by name, so nn never imports patching.
_MOVED = {"patch": ("gptfast.patching", "patch"),
          "PatchReport": ("gptfast.patching", "PatchReport"),
          "hf_attention": ("gptfast.hf", "attention_forward")}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _MOVED[name]
    return getattr(importlib.import_module(module_name), attribute)
