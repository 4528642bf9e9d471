"""flash-attention's Python API (FA2 and FA3 names) on gptfast's attention.

    import gptfast.flash_attn_interface as flash_attn
    out = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(1024, 0))

Three entry points, with flash-attention's keyword names, defaults and positional order (FA2's
where FA2 and FA3 order their positional arguments differently; FA3's extra options are taken
by keyword): :func:`flash_attn_func`, :func:`flash_attn_varlen_func`,
:func:`flash_attn_with_kvcache`. All three run ``gptfast.functional.attention``, the one
dispatch point: the Triton kernels where they support the case, the reference ops otherwise
(under the "auto" backend; a forced "triton" backend raises ``BackendUnavailable`` instead).

The masks are flash-attention's: queries aligned to the bottom right of the keys (query i of
Tq sits at position ``i + Tk - Tq``), ``window_size=(left, right)`` keeps keys in
``[position - left, position + right]``, -1 (or None) meaning unlimited, and ``causal=True``
means right = 0. A row that sees no key gives output 0 and logsumexp -inf (FA3's value; FA2's
CUDA kernel writes +inf there).

Anything not implemented (dropout_p > 0, softcap > 0, alibi_slopes, FP8 descales, qv, paged
KV caches, rotary inside the kv-cache call, ...) raises NotImplementedError naming the
argument; scheduling hints that change no result (num_splits, pack_gqa, sm_margin,
scheduler_metadata) are accepted and have no effect.

torch.compile: ``flash_attn_func`` and ``flash_attn_varlen_func`` are plain Python over
``functional.attention``, which traces to the kernels' custom ops (their registered autograd)
or to the reference's aten ops, without graph breaks; backward needs no recomputation.
``flash_attn_with_kvcache`` is itself a custom op, ``gptfast::flash_attn_with_kvcache``,
declared to mutate the two caches. Integer options (window sizes, ``max_seqlen_*``, an int
``cache_seqlens``) are specialised by dynamo on the first call; a second value recompiles once
with the integer made dynamic, after which other values reuse the graph. Switching a window
between -1 and a bound recompiles (another mask). Tensors (``cu_seqlens_*``, a tensor
``cache_seqlens``) never recompile when their values change.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import functional

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]


# ----------------------------------------------------------------------------- checks --

def _refuse_set(**options):
    """NotImplementedError for the first option that is not None (a feature we lack)."""
    for name, value in options.items():
        if value is not None:
            raise NotImplementedError(
                f"gptfast.flash_attn_interface: {name} is not supported (got a value; pass None)")


# The exact-type test first: an ABC isinstance check costs about a microsecond, and these
# run several times per call, in front of kernels that take tens of microseconds.
def _is_int(value):
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool))


def _is_number(value):
    return type(value) in (int, float) or (isinstance(value, numbers.Real)
                                           and not isinstance(value, bool))


def _check_dropout(dropout_p):
    if not _is_number(dropout_p):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__} (positional "
                        f"arguments after v follow FA2's order: dropout_p, softmax_scale, causal)")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0:
        raise NotImplementedError(f"gptfast.flash_attn_interface: dropout_p > 0 is not "
                                  f"supported (got {dropout_p}); pass 0.0")


def _check_softcap(softcap):
    if softcap is None:
        return
    if not _is_number(softcap):
        raise TypeError(f"softcap must be a number, got {type(softcap).__name__}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 turns it off), got {softcap}")
    if softcap > 0:
        raise NotImplementedError(f"gptfast.flash_attn_interface: softcap > 0 is not supported "
                                  f"(got {softcap}); pass 0.0")


def _check_attention_chunk(attention_chunk):
    if attention_chunk is None:
        return
    if not _is_int(attention_chunk) or attention_chunk < 0:
        raise ValueError(f"attention_chunk must be an int >= 0, got {attention_chunk!r}")
    if attention_chunk != 0:
        raise NotImplementedError(f"gptfast.flash_attn_interface: attention_chunk != 0 is not "
                                  f"supported (got {attention_chunk})")


def _check_hints(num_splits, pack_gqa, sm_margin):
    """Scheduling hints of FA3: checked for type, no effect on the result."""
    if not _is_int(num_splits) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        raise TypeError(f"pack_gqa must be None or a bool, got {type(pack_gqa).__name__}")
    if not _is_int(sm_margin) or sm_margin < 0:
        raise ValueError(f"sm_margin must be an int >= 0, got {sm_margin!r}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_scale(softmax_scale):
    if softmax_scale is None:
        return None
    if not _is_number(softmax_scale):
        raise TypeError(f"softmax_scale must be None or a number, got "
                        f"{type(softmax_scale).__name__} (positional arguments after v follow "
                        f"FA2's order: dropout_p, softmax_scale, causal)")
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    return softmax_scale


def _window(window_size):
    """(left, right) from FA's ``window_size``: ints >= -1, None meaning -1 (FA4's spelling)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    sides = []
    for side, value in zip(("left", "right"), window_size):
        if value is None:
            value = -1
        if not _is_int(value):
            raise TypeError(f"window_size {side} must be an int (-1 for unlimited), got "
                            f"{type(value).__name__}")
        if value < -1:
            raise ValueError(f"window_size {side} must be >= 0, or -1 for unlimited, got {value}")
        sides.append(value)
    return sides[0], sides[1]


def _lse_flags(return_attn_probs, return_softmax_lse, return_lse):
    for name, value in (("return_attn_probs", return_attn_probs),
                        ("return_softmax_lse", return_softmax_lse), ("return_lse", return_lse)):
        _check_bool(name, value)
    if return_attn_probs and (return_softmax_lse or return_lse):
        raise ValueError("pass return_attn_probs (FA2: returns out, softmax_lse, S_dmask) or "
                         "return_softmax_lse / return_lse (returns out, softmax_lse), not both")


def _check_tensor(name, value, dims, layout):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != dims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(value.shape)}")


def _check_qkv(q, k, v, layout_q, layout_kv, dims, names=("k", "v")):
    """q, k, v in FA's layouts: the last two dims (heads, head_dim); k and v alike."""
    kn, vn = names
    _check_tensor("q", q, dims, layout_q)
    _check_tensor(kn, k, dims, layout_kv)
    _check_tensor(vn, v, dims, layout_kv)
    if v.shape[-1] != k.shape[-1]:
        raise NotImplementedError(f"gptfast.flash_attn_interface: {vn}'s head dim ({v.shape[-1]}) "
                                  f"must equal {kn}'s ({k.shape[-1]}); FA3's headdim_v is not "
                                  f"supported")
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape, got {kn} {tuple(k.shape)} and "
                         f"{vn} {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{kn}'s head dim ({k.shape[-1]}) must equal q's ({q.shape[-1]})")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of {kn}/{vn}'s heads "
                         f"({kv_heads})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, {kn}, {vn} must share a dtype, got q {q.dtype}, {kn} {k.dtype}, "
                        f"{vn} {v.dtype}")


def _attend(q, k, v, scale, causal, left, right, document_ids=None, key_lengths=None,
            return_lse=False):
    """functional.attention on FA-layout (B, T, H, D) views (no copies); the output comes back
    (B, Tq, H, D) contiguous (the kernels write it so; the reference's is copied), the
    logsumexp (B, H, Tq) fp32 (fp64 for fp64 inputs)."""
    result = functional.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  scale, causal=causal, window_left=left, window_right=right,
                                  document_ids=document_ids, key_lengths=key_lengths,
                                  return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    return out.transpose(1, 2).contiguous(), lse


def _returned(out, lse, return_attn_probs, wants_lse):
    if return_attn_probs:
        # FA2 with dropout_p == 0 returns an empty S_dmask
        return out, lse, out.new_empty((0,))
    return (out, lse) if wants_lse else out


# --------------------------------------------------------------------- flash_attn_func --

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False, *, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, attention_chunk=0, num_splits=1, pack_gqa=None, sm_margin=0,
                    return_softmax_lse=False, return_lse=False):
    """Attention of q (B, Tq, H, D) over k, v (B, Tk, Hkv, D), as flash-attention's.

    Any strides (views of a fused projection work without a copy); H % Hkv == 0 (query head h
    reads kv head h // (H // Hkv)); Tq != Tk is allowed (bottom-right alignment, see the module
    doc). ``softmax_scale`` defaults to 1/sqrt(D). Differentiable in q, k, v.

    Returns ``out`` (B, Tq, H, D), contiguous, q's dtype; with ``return_softmax_lse`` or
    ``return_lse`` (FA3/FA4 spellings) ``(out, softmax_lse)``, softmax_lse (B, H, Tq) fp32,
    the natural-log logsumexp of each row's scaled scores; with ``return_attn_probs`` (FA2)
    ``(out, softmax_lse, S_dmask)`` with S_dmask empty, as FA2 returns it without dropout. The
    logsumexp is a value to read: its gradient is not part of the contract.

    Fast path: the Triton kernels run the cases ``gptfast.kernels.attention`` supports (today
    causal with Tq == Tk, no logsumexp); the rest runs the reference ops (under "auto").
    ``deterministic`` is accepted and changes nothing: the kernels' backward is deterministic
    unless ``gptfast.kernels.attention.set_atomic_dq(True)`` was called.
    Refused with NotImplementedError: dropout_p > 0, softcap > 0, alibi_slopes, qv, q/k/v
    descales, attention_chunk != 0, a v head dim different from k's.
    """
    _check_qkv(q, k, v, "(batch, seqlen, nheads, headdim)",
               "(batch, seqlen_k, nheads_k, headdim)", 4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale)
    _check_bool("causal", causal)
    left, right = _window(window_size)
    _check_softcap(softcap)
    _refuse_set(alibi_slopes=alibi_slopes, qv=qv, q_descale=q_descale, k_descale=k_descale,
                v_descale=v_descale)
    _check_attention_chunk(attention_chunk)
    _check_hints(num_splits, pack_gqa, sm_margin)
    _check_bool("deterministic", deterministic)
    _lse_flags(return_attn_probs, return_softmax_lse, return_lse)
    wants_lse = return_attn_probs or return_softmax_lse or return_lse
    out, lse = _attend(q, k, v, scale, causal, left, right, return_lse=wants_lse)
    return _returned(out, lse, return_attn_probs, wants_lse)


# -------------------------------------------------------------- flash_attn_varlen_func --

_CU_DTYPES = (torch.int32, torch.int64)


def _check_cu_seqlens(name, cu_seqlens, device):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _CU_DTYPES:
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (batch_size + 1,), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")


def _check_max_seqlen(name, value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)  # FA takes ints; a one-element tensor is read once (a host sync)
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (or None), got {value!r}")
    return value


def _check_cu_values(name, cu_seqlens, total, max_seqlen, max_name):
    """What FA takes for granted, checked where it is free: eager CPU tensors (elsewhere a
    check would synchronise with the device on every call, so it is the caller's contract)."""
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {cu[-1]}")
    if max_seqlen is not None and lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is below the longest sequence "
                         f"({max(lengths)}) of {name}")


def _segment_of(cu_seqlens, total):
    """Index of the sequence that holds each of ``total`` packed rows, (total,) int64, on the
    device without a host sync (rows past cu_seqlens[-1] get the index batch_size)."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, rows, right=True) - 1


def _varlen_documents(q, k, v, cu_seqlens, scale, causal, left, right, wants_lse):
    """Same query and key lengths per sequence: one (1, H, total, D) view, sequences as
    documents (the kernels' document masks)."""
    document_ids = _segment_of(cu_seqlens, q.shape[0])[None]
    out, lse = _attend(q[None], k[None], v[None], scale, causal, left, right,
                       document_ids=document_ids, return_lse=wants_lse)
    return out[0], None if lse is None else lse[0]


def _varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, wants_lse):
    """Different query and key lengths: gather into (batch, max_seqlen, H, D), queries padded
    on the left so that they end where their keys end (FA's bottom-right alignment), keys on
    the right with ``key_lengths``; then back to the packed rows. Index arithmetic on the
    device, no host sync."""
    batch = cu_q.shape[0] - 1
    total_q, total_k = q.shape[0], k.shape[0]
    if batch == 0 or total_q == 0:
        out = q.new_zeros(q.shape) + 0 * q.sum()  # keeps the graph for q's gradient
        lse = torch.full((q.shape[1], total_q), float("-inf"), device=q.device,
                         dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return out, (lse if wants_lse else None)
    cu_q, cu_k = cu_q.long(), cu_k.long()
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    slots_q = torch.arange(max_q, device=q.device)
    slots_k = torch.arange(max_k, device=q.device)
    # padded query slot s of sequence b holds packed row cu_q[b] + s - (max_q - len_q[b])
    rows_q = cu_q[:-1, None] + slots_q[None, :] - (max_q - len_q)[:, None]
    rows_k = cu_k[:-1, None] + slots_k[None, :]
    if total_k == 0:  # every row sees no key; one zero row to gather from
        k, v = k.new_zeros((1, *k.shape[1:])), v.new_zeros((1, *v.shape[1:]))
        total_k = 1
    # slots outside a sequence read some valid row: their outputs are dropped below, and
    # key_lengths keeps padded keys out of every softmax
    q_pad = q[rows_q.clamp(0, total_q - 1)]
    k_pad, v_pad = (t[rows_k.clamp(0, total_k - 1)] for t in (k, v))
    out_pad, lse_pad = _attend(q_pad, k_pad, v_pad, scale, causal, left, right,
                               key_lengths=len_k, return_lse=wants_lse)
    seq = _segment_of(cu_q, total_q).clamp(0, batch - 1)
    packed = torch.arange(total_q, device=q.device)
    slot = (packed - cu_q[seq] + max_q - len_q[seq]).clamp(0, max(max_q - 1, 0))
    out = out_pad[seq, slot]
    lse = None if lse_pad is None else lse_pad.transpose(1, 2)[seq, slot].t().contiguous()
    return out, lse


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *, seqused_q=None,
                           seqused_k=None, qv=None, q_descale=None, k_descale=None,
                           v_descale=None, attention_chunk=0, num_splits=1, pack_gqa=None,
                           sm_margin=0, return_softmax_lse=False, return_lse=False):
    """Attention over packed sequences: q (total_q, H, D), k, v (total_k, Hkv, D); sequence b
    holds rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:...`` of k/v
    (int32 cumulative lengths starting at 0, as FA). Within each sequence the masks of
    :func:`flash_attn_func` apply (bottom-right aligned). Differentiable in q, k, v.

    Two paths:
    - fast: ``cu_seqlens_q is cu_seqlens_k`` (or, in eager mode, equal values: compared
      once, a host sync on CUDA; pass the same tensor to skip it) with total_q == total_k:
      the sequences become document ids (computed on the device by binary search) on one
      (1, H, total, D) view, the kernels' document masks; no host sync, max_seqlen unused.
    - general: different query and key lengths (or distinct cu_seqlens tensors under
      torch.compile): gathered into (batch, max_seqlen, H, D) by index arithmetic on the
      device, run with per-sequence key lengths, scattered back. Needs max_seqlen_q/k (ints;
      None reads them from the lengths, a host sync); today the reference ops run it, with
      (batch, H, max_seqlen_q, max_seqlen_k) scores.

    ``cu_seqlens`` values (starting at 0, non-decreasing, ending at the packed length,
    max_seqlen at least the longest) are checked on eager CPU tensors; on CUDA they are the
    caller's contract (wrong values give wrong rows, never an out-of-bounds access).

    Returns ``out`` (total_q, H, D) contiguous; softmax_lse is (H, total_q) fp32, returned as
    :func:`flash_attn_func` returns it. Refused with NotImplementedError: what
    :func:`flash_attn_func` refuses, and block_table, seqused_q, seqused_k.
    """
    _check_qkv(q, k, v, "(total_q, nheads, headdim)", "(total_k, nheads_k, headdim)", 3)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"shapes {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale)
    _check_bool("causal", causal)
    left, right = _window(window_size)
    _check_softcap(softcap)
    _refuse_set(alibi_slopes=alibi_slopes, block_table=block_table, seqused_q=seqused_q,
                seqused_k=seqused_k, qv=qv, q_descale=q_descale, k_descale=k_descale,
                v_descale=v_descale)
    _check_attention_chunk(attention_chunk)
    _check_hints(num_splits, pack_gqa, sm_margin)
    _check_bool("deterministic", deterministic)
    _lse_flags(return_attn_probs, return_softmax_lse, return_lse)
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    wants_lse = return_attn_probs or return_softmax_lse or return_lse

    same = q.shape[0] == k.shape[0] and cu_seqlens_q is cu_seqlens_k
    if (not same and q.shape[0] == k.shape[0] and not torch.compiler.is_compiling()
            and cu_seqlens_q.dtype == cu_seqlens_k.dtype):
        same = bool(torch.equal(cu_seqlens_q, cu_seqlens_k))
    if same:
        out, lse = _varlen_documents(q, k, v, cu_seqlens_q, scale, causal, left, right, wants_lse)
    else:
        lengths = None
        if max_seqlen_q is None or max_seqlen_k is None:  # read once from the tensors
            lengths = [int((cu[1:] - cu[:-1]).max()) if cu.shape[0] > 1 else 0
                       for cu in (cu_seqlens_q, cu_seqlens_k)]
        max_q = lengths[0] if max_seqlen_q is None else max_seqlen_q
        max_k = lengths[1] if max_seqlen_k is None else max_seqlen_k
        out, lse = _varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale,
                                  causal, left, right, wants_lse)
    return _returned(out, lse, return_attn_probs, wants_lse)


# ------------------------------------------------------------- flash_attn_with_kvcache --

@torch.library.custom_op("gptfast::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                cache_seqlens: Optional[torch.Tensor], softmax_scale: Optional[float],
                causal: bool, window_left: int, window_right: int,
                return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch = q.shape[0]
    keys, values = k_cache[:batch], v_cache[:batch]
    key_lengths = None
    if cache_seqlens is not None:
        key_lengths = cache_seqlens
        if k is not None:
            new = k.shape[1]
            rows = torch.arange(batch, device=q.device)[:, None]
            slots = cache_seqlens.long()[:, None] + torch.arange(new, device=q.device)[None, :]
            keys[rows, slots] = k  # in place: keys and values are views of the caches
            values[rows, slots] = v
            key_lengths = cache_seqlens + new
    with torch.no_grad():  # inference only, as FA's kv-cache call
        out, lse = _attend(q, keys, values, softmax_scale, causal, window_left, window_right,
                           key_lengths=key_lengths, return_lse=return_lse)
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@_kvcache_op.register_fake
def _kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal,
                  window_left, window_right, return_lse):
    b, t, h, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_shape = (b, h, t) if return_lse else (0,)
    lse = q.new_empty(lse_shape, dtype=lse_dtype if return_lse else torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _check_cache_seqlens(cache_seqlens, batch, new, cache_len, device):
    """cache_seqlens as an int32/int64 (batch,) tensor on ``device`` (None stays None)."""
    if cache_seqlens is None:
        return None
    if _is_int(cache_seqlens):
        if not 0 <= cache_seqlens <= cache_len - new:
            raise ValueError(f"cache_seqlens={cache_seqlens} with {new} new keys does not fit a "
                             f"cache of {cache_len} positions")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be None, an int or a tensor, got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in _CU_DTYPES or cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be an int32 (or int64) tensor of shape ({batch},), "
                         f"got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {device}")
    # range checked where free (eager CPU); on CUDA an out-of-range append is a device-side
    # index error, never a silent write elsewhere
    if device.type == "cpu" and not torch.compiler.is_compiling() and batch:
        low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
        if low < 0 or high + new > cache_len:
            raise ValueError(f"cache_seqlens must lie in [0, {cache_len - new}] ({new} new keys "
                             f"in a cache of {cache_len}), got values in [{low}, {high}]")
    return cache_seqlens


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False, *, qv=None, page_table=None,
                            cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None,
                            rotary_seqlens=None, q_descale=None, k_descale=None,
                            v_descale=None, attention_chunk=0, scheduler_metadata=None,
                            pack_gqa=None, sm_margin=0, return_lse=False):
    """Incremental decoding, as flash-attention's: with ``k``, ``v`` (B, Tnew, Hkv, D), writes
    them IN PLACE into ``k_cache``, ``v_cache`` (B_cache >= B, S, Hkv, D) at positions
    ``cache_seqlens[b] ...`` of row b, then attends q (B, Tq, H, D) over the first
    ``cache_seqlens[b] + Tnew`` keys of row b, queries aligned to the bottom right (the last
    query at the last key). Without k/v it attends over the first ``cache_seqlens[b]`` keys
    (all S when cache_seqlens is None). ``cache_seqlens``: an int or an int32 (B,) tensor;
    required with k/v, and ``cache_seqlens + Tnew <= S`` (checked for ints and CPU tensors;
    on CUDA an out-of-range append is a device-side index error).

    Returns ``out`` (B, Tq, H, D), or ``(out, softmax_lse)`` with ``return_softmax_lse`` (or
    ``return_lse``), softmax_lse (B, H, Tq) fp32. No backward (as FA): the op runs without
    autograd. A torch custom op, ``gptfast::flash_attn_with_kvcache``, that mutates the caches.
    Runs the reference ops until the kernels take per-row key lengths.

    Refused with NotImplementedError: rotary_cos/rotary_sin (rotate q and k before the call),
    cache_batch_idx, cache_leftpad, block_table/page_table (paged caches), cu_seqlens_q,
    cu_seqlens_k_new, max_seqlen_q, rotary_seqlens, qv, descales, alibi_slopes, softcap > 0,
    attention_chunk != 0. ``rotary_interleaved`` has no effect without rotary tables.
    """
    _check_tensor("q", q, 4, "(batch, seqlen, nheads, headdim)")
    _check_tensor("k_cache", k_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim)")
    _check_tensor("v_cache", v_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim)")
    _refuse_set(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
                cache_leftpad=cache_leftpad, block_table=block_table, page_table=page_table,
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new,
                max_seqlen_q=max_seqlen_q, rotary_seqlens=rotary_seqlens, qv=qv,
                q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                alibi_slopes=alibi_slopes)
    _check_qkv(q, k_cache, v_cache, "(batch, seqlen, nheads, headdim)",
               "(batch_cache, seqlen_cache, nheads_k, headdim)", 4, names=("k_cache", "v_cache"))
    batch, cache_len = q.shape[0], k_cache.shape[1]
    if k_cache.shape[0] < batch:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} rows, fewer than q's batch {batch}")
    if (k is None) != (v is None):
        given = {name: "None" if t is None else "a tensor" for name, t in (("k", k), ("v", v))}
        raise ValueError(f"k and v must be given together, got k={given['k']} and v={given['v']}")
    new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, 4, "(batch, seqlen_new, nheads_k, headdim)")
            if t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{name} must be (batch={batch}, seqlen_new, "
                                 f"{k_cache.shape[2]}, {k_cache.shape[3]}), got {tuple(t.shape)}")
            if t.dtype != k_cache.dtype:
                raise TypeError(f"{name} must have the cache's dtype {k_cache.dtype}, "
                                f"got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with k and v (where to append them)")
        new = k.shape[1]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    cache_seqlens = _check_cache_seqlens(cache_seqlens, batch, new, cache_len, q.device)
    scale = _check_scale(softmax_scale)
    _check_bool("causal", causal)
    left, right = _window(window_size)
    _check_softcap(softcap)
    _check_attention_chunk(attention_chunk)
    _check_bool("rotary_interleaved", rotary_interleaved)
    _check_hints(num_splits, pack_gqa, sm_margin)
    _lse_flags(False, return_softmax_lse, return_lse)
    wants_lse = return_softmax_lse or return_lse
    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, cache_seqlens,
                           None if scale is None else float(scale), causal, left, right,
                           wants_lse)
    return (out, lse) if wants_lse else out
