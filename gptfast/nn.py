"""Drop-in modules built on ``gptfast.functional``, and ``patch(model)``.

- :class:`LayerNorm`: a ``torch.nn.LayerNorm`` (same constructor, attributes and state_dict)
  whose forward is ``gptfast.layer_norm``; :meth:`LayerNorm.add_and_norm` fuses a residual add.
- :class:`CrossEntropyLoss` and :class:`LinearCrossEntropy`: ``gptfast.cross_entropy`` and the
  fused ``gptfast.linear_cross_entropy`` (never materialises N x V) as modules.
- :class:`CausalSelfAttention`: nanoGPT's attention (``c_attn``, ``c_proj``) with optional
  grouped-query heads and a :class:`KVCache` for generation.
- :func:`patch`: makes another model's LayerNorms and causal attention (nanoGPT-style modules,
  Hugging Face ``GPT2Attention``) run on gptfast's ops, in place.

Every module runs wherever ``gptfast.functional`` runs: Triton kernels on CUDA, plain PyTorch
elsewhere (see ``gptfast.use_backend``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, patch_probe, reference
from .patching import nanochat

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

        cached = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            if document_ids is None:
                k, v = kv_cache.append(k, v)
            else:
                k, v, document_ids = kv_cache.append(k, v, document_ids)
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


# ------------------------------------------------------------------------------ patch --

LAYER_NORM = "LayerNorm"
NANOGPT_ATTENTION = "nanoGPT attention"
HF_GPT2_ATTENTION = "GPT2Attention"
HF_ATTENTION = "HF attention"  # other transformers models: switched to attn_implementation "gptfast"
HF_IMPLEMENTATION = "gptfast"  # the name gptfast registers in transformers' AttentionInterface


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did: qualified names replaced (with their kind), names skipped with why.

    ``kinds`` maps each replaced name to ``"LayerNorm"``, ``"nanoGPT attention"`` or
    ``"GPT2Attention"``; ``already`` lists the modules that ran on gptfast before the call
    (gptfast's own modules, or patched by an earlier call).
    """

    replaced: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)
    kinds: dict = dataclasses.field(default_factory=dict)
    already: list = dataclasses.field(default_factory=list)  # ran on gptfast before this call
    checked: dict = dataclasses.field(default_factory=dict)  # attention name -> what the probe found

    def names(self, kind: str) -> list:
        """The replaced names of one kind, in module order."""
        return [name for name in self.replaced if self.kinds.get(name) == kind]

    def _add(self, name: str, kind: str) -> None:
        self.replaced.append(name)
        self.kinds[name] = kind

    def __str__(self):
        attention = len(self.replaced) - len(self.names(LAYER_NORM))
        lines = [f"gptfast.patch: {len(self.names(LAYER_NORM))} LayerNorm(s) and {attention} "
                 f"attention module(s) now run on gptfast, {len(self.already)} already did, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  skipped {name or '<root>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def patch(model: nn.Module, verbose: bool = False, return_report: bool = False, *,
          layer_norm: bool = True, attention: bool = True, loss: bool = True):
    """Make ``model`` compute its LayerNorms and causal attention with gptfast's ops, in place.

    - Each exact ``torch.nn.LayerNorm`` over the last dim becomes a :class:`gptfast.nn.LayerNorm`
      (its class is switched; :class:`LayerNorm` adds no state). LayerNorms over several dims
      and subclasses of ``torch.nn.LayerNorm`` (which may override forward) are skipped.
    - LayerNorm-like modules of other classes (nanoGPT's ``LayerNorm``: a 1-D ``weight``, an
      optional ``bias``, no other state, ``F.layer_norm`` in forward) are recognised by what
      they compute: their forward is checked against ``F.layer_norm`` on probe inputs (which
      also pins ``eps``, from an ``eps``/``variance_epsilon`` attribute or 1e-5), and only a
      match gets a forward on ``gptfast.layer_norm``. A module named "*Norm*" that does not
      match (RMSNorm, GroupNorm...) is reported as skipped with the reason.
    - nanoGPT-style attention (a module with ``c_attn``/``c_proj`` Linears and ``n_head``,
      ``n_embd``, computing causal self-attention as nanoGPT's CausalSelfAttention) gets a
      forward that runs ``gptfast.causal_attention``; in training with attention dropout > 0
      it runs SDPA with that dropout instead, as nanoGPT's flash path does. Before switching
      (``gptfast.patch_probe``), the module runs in fp64 on a probe as long as its block size
      (its ``bias`` buffer, else a ``block_size``/``n_positions``... on the module, its config,
      the model or the model's config, else 1024 tokens; capped so the probe's scores stay
      within 512 MiB): a sliding window in its mask becomes ``causal_attention(window=w)``, any
      other mask or other math (rotary embeddings, another scale...) leaves it alone, and
      sequences longer than the probe run the module's own forward. Every dropout its training
      forward applies, under any name, is traced: dropout on the attention probabilities (or
      SDPA's ``dropout_p``) and on ``c_proj``'s returned output is kept, read from the same
      submodule or attribute at each call; any other dropout leaves the module alone.
      ``report.checked`` says what the probe found.
    - Hugging Face ``GPT2Attention`` modules running the "sdpa" implementation (HF's default)
      run through the attention function "gptfast", registered in transformers'
      AttentionInterface (``gptfast.hf``): a pure causal call goes to gptfast's attention; any
      other call (a padding mask, decoding with a KV cache, attention dropout in training) runs
      HF's SDPA function, exactly as before. Cross-attention and models loaded with another
      ``attn_implementation`` (eager, flash, flex) are skipped.
    - Other Hugging Face models (Llama, Mistral, Qwen2...) running "sdpa" switch to
      attn_implementation "gptfast" (``gptfast.hf``); their attention modules are reported
      as ``"HF attention"``, or skipped with the reason.

    - nanochat's ``GPT`` (recognised by structure) goes to ``gptfast.patching.nanochat``: its
      module-level ``norm`` (process-wide; ``layer_norm=False`` keeps it), attention and, with
      ``loss``, lm_head + softcap + cross-entropy as one fused loss; the report is a
      ``NanochatReport``. ``gptfast.unpatch(model)`` undoes a patch.

    Module objects keep their identity, Parameters, hooks and state_dict keys, so optimisers
    already holding the parameters and existing checkpoints are unaffected. Patch before
    ``torch.compile``. Patching twice is harmless: the second report lists the modules as
    ``already`` on gptfast. Returns ``model``, or ``(model, PatchReport)``
    with ``return_report=True``; ``verbose=True`` prints the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if nanochat.is_nanochat_gpt(model):
        report = nanochat.patch(model, norm=layer_norm, attention=attention, loss=loss)
        if verbose:
            print(report)
        return (model, report) if return_report else model
    report = PatchReport()
    for name, module in model.named_modules():
        if _runs_on_gptfast(module):
            report.already.append(name)
        elif isinstance(module, nn.LayerNorm):
            if layer_norm:
                _patch_layer_norm(name, module, report)
        elif layer_norm and _looks_like_layer_norm(module):
            _patch_layer_norm_like(name, module, report)
        elif attention:
            _patch_attention(name, module, model, report)
    if attention:
        _patch_hf_model(model, report)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _patch_layer_norm(name: str, module: nn.LayerNorm, report: PatchReport) -> None:
    if type(module) is not nn.LayerNorm:
        report.skipped[name] = (f"{type(module).__qualname__} subclasses torch.nn.LayerNorm; its "
                                "forward may differ, so it is left alone")
    elif len(module.normalized_shape) != 1:
        report.skipped[name] = (f"normalized_shape {tuple(module.normalized_shape)} spans more "
                                "than the last dim")
    else:
        module._gptfast_replaced_class = type(module)  # for gptfast.unpatch
        module.__class__ = LayerNorm
        report._add(name, LAYER_NORM)


def _patch_attention(name: str, module: nn.Module, root: nn.Module, report: PatchReport) -> None:
    if _is_hf_gpt2_attention(module):
        kind, reason, found = HF_GPT2_ATTENTION, _patch_hf_attention(module), None
    elif _looks_like_nanogpt_attention(module):
        kind = NANOGPT_ATTENTION
        reason, found = _patch_nanogpt_attention(module, root)
    else:
        return
    if reason is None:
        report._add(name, kind)
        if found is not None:
            report.checked[name] = found
    else:
        report.skipped[name] = reason


# ---------------------------------------------------------------- nanoGPT attention --

def _looks_like_nanogpt_attention(module: nn.Module) -> bool:
    if isinstance(module, CausalSelfAttention):  # gptfast's own: already on gptfast
        return False
    return all(hasattr(module, attr) for attr in ("c_attn", "c_proj", "n_head", "n_embd"))


def _is_linear(module, in_features: int, out_features: int) -> bool:
    return isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (
        in_features, out_features)


def _nanogpt_shape_problem(module: nn.Module) -> Optional[str]:
    n_head, n_embd = module.n_head, module.n_embd
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n_head, n_embd)) \
            or n_embd % n_head:
        return f"n_head={n_head!r}, n_embd={n_embd!r} are not positive ints with n_head | n_embd"
    c_attn, c_proj = module.c_attn, module.c_proj
    if not _is_linear(c_attn, n_embd, 3 * n_embd):
        return f"c_attn is not a Linear({n_embd}, {3 * n_embd}) projecting to [q | k | v]"
    if not _is_linear(c_proj, n_embd, n_embd):
        return f"c_proj is not a Linear({n_embd}, {n_embd})"
    return None


def _nanogpt_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT's CausalSelfAttention.forward on gptfast.causal_attention, with the mask and
    dropouts ``patch`` found in the module (``_gptfast_window``, ``_gptfast_dropout``)."""
    if x.size(1) > self._gptfast_probe_length:  # longer than the probe proved: its own math
        return type(self)._gptfast_original_class.forward(self, x)
    y = _nanogpt_project(self, _nanogpt_attend(self, *_nanogpt_heads(self, x),
                                               self._gptfast_window))
    residual = self._gptfast_dropout.residual
    return y if residual is None else residual.apply(self, y)


def _nanogpt_heads(self, x: torch.Tensor) -> tuple:
    """q, k, v (batch, n_head, seq, head_dim) from c_attn, as nanoGPT splits them."""
    batch, seq, channels = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    return tuple(t.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
                 for t in (q, k, v))


def _nanogpt_project(self, y: torch.Tensor) -> torch.Tensor:
    """c_proj of the heads (batch, n_head, seq, head_dim) put back side by side."""
    batch, _, seq, _ = y.shape
    return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, self.n_embd))


def _nanogpt_attend(self, q, k, v, window: Optional[int]) -> torch.Tensor:
    attention = self._gptfast_dropout.attention
    dropout_p = 0.0 if attention is None else attention.probability(self)
    if dropout_p == 0.0:
        return functional.causal_attention(q, k, v, window=window)
    # SDPA applies the attention dropout, as nanoGPT's flash path does
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    visible = reference.attention_mask(q.shape[-2], k.shape[-2], window=window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)


def _probe_replacement(self, x: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """The patched forward's math in eval mode with ``window``, for the mask probe."""
    return _nanogpt_project(self, functional.causal_attention(*_nanogpt_heads(self, x),
                                                               window=window))


_PATCHED_CLASSES: dict = {}


def _patched_class(original: type, kind: str) -> type:
    """A subclass of ``original`` whose forward is ``_PATCHED_FORWARDS[kind]`` (one per class and kind).

    It keeps the original's name; pickling and deepcopy go through :func:`_rebuild_patched`,
    so a patched module survives both without this dynamically made class being importable.
    """
    patched = _PATCHED_CLASSES.get((original, kind))
    if patched is None:
        patched = type(original.__name__, (original,), {
            "forward": _PATCHED_FORWARDS[kind],
            "__reduce_ex__": _reduce_patched,
            "_gptfast_original_class": original,
            "_gptfast_kind": kind,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
        })
        _PATCHED_CLASSES[(original, kind)] = patched
    return patched


def _rebuild_patched(original: type, kind: str) -> nn.Module:
    return object.__new__(_patched_class(original, kind))


def _reduce_patched(self, protocol):
    cls = type(self)
    return _rebuild_patched, (cls._gptfast_original_class, cls._gptfast_kind), self.__getstate__()


def _runs_on_gptfast(module: nn.Module) -> bool:
    """gptfast's own modules, and modules an earlier patch() switched."""
    return (isinstance(module, (LayerNorm, CausalSelfAttention))
            or getattr(type(module), "_gptfast_original_class", None) is not None
            or bool(getattr(module, "_gptfast_attention", False)))


def _patch_nanogpt_attention(module: nn.Module, root: nn.Module) -> tuple:
    """(None, what was found) after switching the module, or (why not, None)."""
    reason = _nanogpt_shape_problem(module)
    if reason is None and module.c_attn.weight.device.type == "meta":
        reason = "its parameters are on the meta device, so the patched forward cannot be checked"
    if reason is not None:
        return reason, None
    original = type(module).forward
    plan, reason = patch_probe.find_dropout_plan(module, original)
    if reason is not None:
        return reason, None
    length = patch_probe.probe_length(module, root)
    window, reason = patch_probe.probe_mask(module, length, original, _probe_replacement)
    if reason is not None:
        return reason, None
    module._gptfast_window = window
    module._gptfast_probe_length = length
    module._gptfast_dropout = plan
    module.__class__ = _patched_class(type(module), NANOGPT_ATTENTION)
    mask = "causal" if window is None else f"sliding window {window}"
    return None, f"{mask}, checked up to {length} tokens{_describe_dropout(plan)}"


def _describe_dropout(plan) -> str:
    kept = [f"{where} dropout from {source.name}" for where, source in
            (("attention", plan.attention), ("residual", plan.residual)) if source is not None]
    return "; keeps " + " and ".join(kept) if kept else ""


# ------------------------------------------------------------ LayerNorm-like modules --

_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")


def _looks_like_layer_norm(module: nn.Module) -> bool:
    """A leaf whose state is a 1-D ``weight`` and an optional ``bias`` of the same shape."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if next(module.children(), None) is not None or next(module.buffers(), None) is not None:
        return False
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.numel() == 0:
        return False
    if bias is not None and (not isinstance(bias, nn.Parameter) or bias.shape != weight.shape):
        return False
    allowed = {"weight"} | ({"bias"} if bias is not None else set())
    return {name for name, _ in module.named_parameters(recurse=False)} == allowed


def _layer_norm_like_eps(module: nn.Module) -> float:
    for attribute in _EPS_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 1e-5  # nanoGPT's LayerNorm passes 1e-5 to F.layer_norm in its forward


def _layer_norm_like_forward(self, input: torch.Tensor) -> torch.Tensor:
    """A LayerNorm-like module's forward on gptfast.layer_norm (its eps found by the probe)."""
    return functional.layer_norm(input, self.weight, getattr(self, "bias", None), self._gptfast_eps)


def _layer_norm_probe_mismatch(module: nn.Module, eps: float) -> Optional[str]:
    """None when ``F.layer_norm`` with ``eps`` reproduces the module's forward, else why not.

    The probe has ordinary rows and rows of variance ~1e-6, where a different eps shows.
    """
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.device.type == "meta":
        return "its parameters are on the meta device, so its forward cannot be checked"
    generator = torch.Generator().manual_seed(0)
    features = weight.numel()
    x = torch.randn(2, 3, features, generator=generator, dtype=torch.float64)
    x[1] = 0.5 + 1e-3 * x[1]
    x = x.to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            expected = type(module).forward(module, x)
            actual = F.layer_norm(x, (features,), weight, bias, eps)
    except Exception as err:
        return f"its forward could not be checked on a probe input ({type(err).__name__}: {err})"
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return "its forward does not return a tensor of its input's shape"
    difference = patch_probe.probe_difference(expected, actual, full_precision_tolerance=1e-4)
    if difference is not None:
        return (f"its forward is not F.layer_norm over the last dim with eps={eps:g} on a probe "
                f"input (max difference {difference:.2e}), so it is left alone")
    return None


def _patch_layer_norm_like(name: str, module: nn.Module, report: PatchReport) -> None:
    eps = _layer_norm_like_eps(module)
    reason = _layer_norm_probe_mismatch(module, eps)
    if reason is None:
        module._gptfast_eps = eps
        module.__class__ = _patched_class(type(module), LAYER_NORM)
        report._add(name, LAYER_NORM)
    elif "norm" in type(module).__name__.lower():
        report.skipped[name] = reason


_PATCHED_FORWARDS = {
    NANOGPT_ATTENTION: _nanogpt_attention_forward,
    LAYER_NORM: _layer_norm_like_forward,
}


# ------------------------------------------------------------- Hugging Face GPT-2 --

def _is_hf_gpt2_attention(module: nn.Module) -> bool:
    return any(cls.__name__ == "GPT2Attention" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)


def hf_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as attn_implementation "gptfast":
    :func:`gptfast.hf.attention_forward`."""
    from .hf import attention_forward

    return attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_hf_attention() -> Optional[str]:
    """Registers "gptfast" with transformers (gptfast.hf.register); None or why not."""
    from . import hf

    try:
        hf.register()
    except RuntimeError as err:
        return str(err)
    return None


def _patch_hf_model(model: nn.Module, report: PatchReport) -> None:
    """Any transformers model but GPT-2 (above): its attn_implementation becomes "gptfast"."""
    from . import hf  # imports transformers only for a transformers model

    if report.names(HF_GPT2_ATTENTION) or not hf.is_transformers_model(model):
        return
    names, outcome = hf.switch_model(model)
    for name in names:
        if outcome is None:
            report._add(name, HF_ATTENTION)
        elif outcome == hf.ALREADY:
            report.already.append(name)
        else:
            report.skipped[name] = outcome


def _patch_hf_attention(module: nn.Module) -> Optional[str]:
    if getattr(module, "is_cross_attention", False):
        return "cross-attention (over encoder states, not causal) keeps HF's forward"
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", HF_IMPLEMENTATION):
        return (f"the model runs attn_implementation={implementation!r}; gptfast.patch replaces "
                "HF's default 'sdpa' (load the model with attn_implementation='sdpa' to patch it)")
    reason = _register_hf_attention()
    if reason is None:
        config._attn_implementation = HF_IMPLEMENTATION
        module._gptfast_attention = True
    return reason
