"""``attn_implementation="gptfast"`` for Hugging Face transformers.

:func:`register` adds "gptfast" to transformers' ``AttentionInterface`` (the attention
function, :func:`attention_forward`) and ``AttentionMaskInterface`` (the mask builder,
:func:`build_mask`). Every model written on that interface (Llama, Mistral, Qwen2, GPT-2...)
then runs its causal self-attention through ``gptfast.functional.attention``:

- causal attention without padding: the mask builder returns no mask, as for FA2;
- sliding windows (Mistral, Qwen2 ``sliding_attention`` layers): HF's window w lets query i
  see keys ``i - w < j <= i``, which is ``window_left = w - 1``;
- packed sequences: ``position_ids`` that do not step by 1 start a new document (the rule of
  transformers' masks; FA2's "restart at 0" is a case of it), or FA's ``cu_seq_lens_q/k``
  for a batch of one packed row, run as ``document_ids``. Where HF builds a 4-D mask for
  them (no cache), it is compared once per forward with the document mask and used only if
  equal.

Anything else (a padding or custom mask, decoding with a KV cache, attention dropout in
training, non-causal attention, ``position_bias``) runs transformers' SDPA function with the
mask SDPA would get, and logs once (``logging.getLogger("gptfast")``) why.
``gptfast.patch(model)`` switches an HF model loaded with the default "sdpa" to "gptfast"
(:mod:`gptfast.patching.hf`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import weakref

import torch

from . import functional, reference

NAME = "gptfast"  # the attn_implementation gptfast registers
MIN_TRANSFORMERS = (4, 53)  # the first release with AttentionMaskInterface (masking_utils)

# Arguments of transformers' attention functions whose math neither gptfast nor SDPA computes.
_REFUSED = ("softcap", "s_aux")
# Arguments that change the math in ways SDPA's function handles and ours does not.
_SDPA_ONLY = ("position_bias",)

logger = logging.getLogger("gptfast")
_LOGGED: set = set()  # fallback reasons already logged


# -------------------------------------------------------------------------- register --

def availability() -> str:
    """One line for ``gptfast info``: whether :func:`register` can work here (read from the
    package metadata; transformers is not imported)."""
    from .extras import install_hint

    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return f"unavailable: transformers is not installed ({install_hint('transformers')})"
    numbers = tuple(int(part) if part.isdigit() else 0 for part in version.split(".")[:2])
    if numbers < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        return f"unavailable: transformers {version} < {floor} has no AttentionMaskInterface"
    return (f"available with transformers {version}: gptfast.hf.register(), then "
            f"attn_implementation={NAME!r} (or gptfast.patch(model))")


def register() -> None:
    """Registers ``attn_implementation="gptfast"`` with transformers (safe to call again).

    Raises ``MissingExtra`` (an ImportError) without transformers, RuntimeError with a
    transformers older than 4.53 (no ``AttentionMaskInterface``).
    """
    from .extras import optional_import

    with optional_import("transformers", "gptfast.hf.register()"):
        import transformers
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise RuntimeError(
            f"transformers {transformers.__version__} has no AttentionInterface/"
            f"AttentionMaskInterface ({err}); attn_implementation={NAME!r} needs transformers "
            f">= {'.'.join(map(str, MIN_TRANSFORMERS))}") from None
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, build_mask)


# ------------------------------------------------------------------------------ mask --

def build_mask(*args, **kwargs):
    """The mask builder registered for "gptfast" (called by transformers' create_*_mask).

    No mask (None) where :func:`attention_forward` applies the pattern itself: causal or a
    sliding window of the config's size, no padding, no custom mask functions, as many
    queries as keys; SDPA's mask (transformers' ``sdpa_mask``) otherwise.
    """
    if not args and _needs_no_mask(kwargs):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _needs_no_mask(kwargs) -> bool:
    from transformers.masking_utils import causal_mask_function

    # create_*_mask clears allow_is_causal_skip for packed sequences, block ids, custom (or/and)
    # mask functions and models that need the mask itself.
    if not kwargs.get("allow_is_causal_skip", True):
        return False
    local_size, config = kwargs.get("local_size"), kwargs.get("config")
    if local_size is None:
        if kwargs.get("mask_function") is not causal_mask_function:
            return False
    elif (config is None or getattr(config, "attention_chunk_size", None) is not None
          or local_size != getattr(config, "sliding_window", None)):
        return False  # chunked attention (Llama 4) or a local size we cannot name
    q_length, cache_position = kwargs.get("q_length"), kwargs.get("cache_position")
    if q_length is None and cache_position is not None:  # transformers 4.x passes positions
        q_length = cache_position.shape[0]
    q_offset = kwargs.get("q_offset", 0)
    if (q_length is None or q_length != kwargs.get("kv_length") or kwargs.get("kv_offset", 0) != 0
            or isinstance(q_offset, torch.Tensor) or q_offset != 0):
        return False
    padding = kwargs.get("attention_mask")
    if padding is None:
        return True
    if torch.compiler.is_compiling() or padding.dim() != 2 or padding.shape[-1] != q_length:
        return False
    return bool(padding.all())


# ------------------------------------------------------------------------- attention --

def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, is_causal=None, **kwargs):
    """transformers' attention-function interface: q (B, H, T, D), k/v (B, Hkv, T, D) ->
    ((B, T, H, D), None). Causal self-attention runs ``gptfast.functional.attention``; other
    calls run transformers' SDPA function (see the module docstring)."""
    for name in _REFUSED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation={NAME!r} does not compute {name} (neither does SDPA); "
                f"load the model with attn_implementation='eager'")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    seq = query.shape[2]
    if not causal:
        return _sdpa("non-causal attention (an encoder or cross-attention)", module, query, key,
                     value, attention_mask, dropout, scaling, is_causal, kwargs)
    if key.shape[2] != seq:
        return _sdpa("queries and keys of different lengths (decoding with a KV cache)", module,
                     query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    window_left = _window_left(sliding_window)
    documents = _document_ids(kwargs.get("position_ids"), query.shape[0], seq)
    reason = None
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        # FA's varlen boundaries (HF's DataCollatorWithFlattening): FA2 prefers them too
        documents = _documents_from_boundaries(kwargs.get("cu_seq_lens_q"),
                                               kwargs.get("cu_seq_lens_k"), query.shape[0], seq)
        if documents is None:
            reason = "cu_seq_lens_q/k that are not one packed row of queries and keys alike"
    reason = reason or _unsupported(attention_mask, dropout, window_left, documents, kwargs)
    if reason is None:
        out = functional.attention(query, key, value, scaling, causal=True,
                                   window_left=window_left, document_ids=documents)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None and (window_left >= 0 or documents is not None):
        # the mask builder left the window/documents to us: SDPA needs them spelled out
        attention_mask = reference.flash_mask(seq, seq, True, window_left, -1, documents,
                                              device=query.device)
    return _sdpa(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                 kwargs)


def _window_left(sliding_window) -> int:
    """HF's sliding window w (query i sees keys i - w < j <= i) as FA's window_left."""
    if sliding_window is None:
        return -1
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    return sliding_window - 1


def _unsupported(attention_mask, dropout, window_left, documents, kwargs):
    """None when gptfast computes this causal call, else why not."""
    if dropout:
        return "attention dropout in training"
    for name in _SDPA_ONLY:
        if kwargs.get(name) is not None:
            return f"{name}"
    if kwargs.get("output_attentions", False):
        return "output_attentions=True"
    if attention_mask is not None and not _is_our_mask(attention_mask, window_left, documents):
        return "a padding or custom attention mask"
    return None


# Caches: one answer per position_ids tensor and per mask tensor (all layers of a forward share
# them), so the checks that read values sync with the device once per forward, not per layer.
_DOCUMENTS = torch.utils.weak.WeakIdKeyDictionary()
_MASKS = torch.utils.weak.WeakIdKeyDictionary()


def _document_ids(position_ids, batch, seq):
    """(batch, seq) document ids where ``position_ids`` mark packed sequences, else None."""
    if (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
            or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch)):
        return None
    if torch.compiler.is_compiling():  # reading the values would break the graph
        return _documents_from(position_ids, batch)
    cached = _DOCUMENTS.get(position_ids)
    if cached is not None and cached[0] == (position_ids._version, batch):
        return cached[1]
    documents = _documents_from(position_ids, batch)
    if not bool(documents[:, -1].any()):
        documents = None  # one sequence per row
    _DOCUMENTS[position_ids] = ((position_ids._version, batch), documents)
    return documents


def _documents_from_boundaries(cu_q, cu_k, batch, seq):
    """(1, seq) document ids from FA's cumulative lengths, or None unless the batch is one
    packed row and cu_seq_lens_q == cu_seq_lens_k == [0, ..., seq]."""
    if (batch != 1 or not isinstance(cu_q, torch.Tensor) or not isinstance(cu_k, torch.Tensor)
            or cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.shape[0] < 2
            or cu_q.is_floating_point()):
        return None
    if torch.compiler.is_compiling():  # no value checks: only the same tensor for q and k
        return _documents_within(cu_q, seq) if cu_k is cu_q else None
    cached = _DOCUMENTS.get(cu_q)
    if (cached is not None and cached[0] == (cu_q._version, cu_k._version, seq)
            and cached[1]() is cu_k):
        return cached[2]
    valid = (int(cu_q[0]) == 0 and int(cu_q[-1]) == seq and bool((cu_q[1:] >= cu_q[:-1]).all())
             and (cu_k is cu_q or torch.equal(cu_q, cu_k)))
    documents = _documents_within(cu_q, seq) if valid else None
    # a weak reference: cu_k is often cu_q itself, which a strong one would keep alive forever
    _DOCUMENTS[cu_q] = ((cu_q._version, cu_k._version, seq), weakref.ref(cu_k), documents)
    return documents


def _documents_within(cu, seq):
    positions = torch.arange(seq, device=cu.device, dtype=cu.dtype)
    return torch.bucketize(positions, cu[1:], right=True).to(torch.int32)[None]


def _documents_from(position_ids, batch):
    starts = torch.diff(position_ids, dim=1) != 1
    documents = torch.cat([starts.new_zeros(starts.shape[0], 1, dtype=torch.int32),
                           starts.cumsum(1, dtype=torch.int32)], dim=1)
    return documents.expand(batch, -1).contiguous()


def _is_our_mask(mask, window_left, documents) -> bool:
    """Whether a 4-D boolean mask is exactly the causal/window/document pattern we apply."""
    if (torch.compiler.is_compiling() or not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[2] != mask.shape[3]):
        return False
    seq = mask.shape[2]
    if documents is not None and (documents.shape[1] != seq or mask.shape[0] not in (1, documents.shape[0])):
        return False
    cached = _MASKS.get(mask)
    if cached is not None and cached[0] == (mask._version, window_left) and cached[1] is documents:
        return cached[2]
    expected = reference.flash_mask(seq, seq, True, window_left, -1, documents, device=mask.device)
    batch = max(mask.shape[0], expected.shape[0])
    same = torch.equal(mask.expand(batch, 1, seq, seq), expected.expand(batch, 1, seq, seq))
    _MASKS[mask] = ((mask._version, window_left), documents, same)
    return same


def _sdpa(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    if reason not in _LOGGED and not torch.compiler.is_compiling():  # a log line breaks graphs
        _LOGGED.add(reason)
        logger.warning("attn_implementation=%r: %s runs transformers' SDPA attention, not "
                       "gptfast's (logged once)", NAME, reason)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)

