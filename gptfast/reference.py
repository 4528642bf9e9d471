"""The public ops in plain PyTorch: the fallback backend and the test oracle.

Every function here has exactly the semantics of its public counterpart in
``gptfast.functional`` (which validates arguments before calling in here), so a
kernel is correct when it matches these on the same inputs promoted to fp64.

Dtype rules, shared by every backend:
- statistics (mean/rstd, logsumexp) are computed in fp32, or fp64 when the input is fp64;
- ``layer_norm`` returns ``x.dtype`` whatever the parameter dtype (bf16 activations with
  fp32 weights work, as under autocast);
- losses are returned in fp32 (fp64 for fp64 logits), never in bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: where statistics are kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim: (x - mean) * rstd * weight + bias, in ``x.dtype``."""
    acc = compute_dtype(x.dtype)
    shape = (x.shape[-1],)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(x.to(acc), shape, w, b, eps).to(x.dtype)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """Returns ``(layer_norm(x + residual), x + residual)``.

    The sum is taken in the promoted dtype of x and residual (a bf16 branch added to an
    fp32 residual stream stays fp32), and the normalised output has that dtype too.
    """
    total = x + residual
    return layer_norm(total, weight, bias, eps), total


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    # query head h reads kv head h // groups: the same grouping as SDPA's enable_gqa
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def attention_mask(seq_q, seq_k, document_ids=None, window=None, device=None):
    """Which keys each query sees: bool (B or 1, 1, seq_q, seq_k), True = attend.

    The queries are the last ``seq_q`` of ``seq_k`` positions (query i sits at position
    ``p = seq_k - seq_q + i``, as after a KV cache). Query p sees key j when ``j <= p``,
    ``p - window < j`` (if ``window``) and ``document_ids[b, j] == document_ids[b, p]``
    (if ``document_ids``, shape (B, seq_k)).
    """
    device = document_ids.device if document_ids is not None else device
    query_pos = torch.arange(seq_k - seq_q, seq_k, device=device)[:, None]
    key_pos = torch.arange(seq_k, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (key_pos > query_pos - window)
    visible = visible[None, None]
    if document_ids is not None:
        same_document = document_ids[:, seq_k - seq_q:, None] == document_ids[:, None, :]
        visible = visible & same_document[:, None]
    return visible


def causal_attention(q, k, v, scale=None, document_ids=None, window=None):
    """softmax(q k^T * scale + mask) v, with kv heads shared by H // Hkv query heads.

    q: (B, H, T, D); k, v: (B, Hkv, T, D). scale defaults to 1/sqrt(D). The mask is causal,
    and with ``document_ids`` (B, T) and/or ``window`` also confines each query to its own
    document and to the last ``window`` positions (:func:`attention_mask`); then SDPA runs
    with that explicit boolean mask (any dtype, fp64 included).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if document_ids is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    t = q.shape[-2]
    visible = attention_mask(t, t, document_ids, window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def causal_attention_math(q, k, v, scale=None, document_ids=None, window=None):
    """The same as :func:`causal_attention` written out, for tests that want no SDPA."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    t = q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = attention_mask(t, t, document_ids, window, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def flash_mask(seq_q, seq_k, causal=True, window_left=-1, window_right=-1, document_ids=None,
               key_lengths=None, device=None):
    """Which keys each query sees under flash-attention's rules: bool (B or 1, 1, seq_q, seq_k).

    Query i sits at position ``p = L - seq_q + i`` where L is the number of valid keys
    (``key_lengths[b]``, else seq_k): queries are aligned to the bottom right, as FA aligns
    them after a KV cache. Query i sees key j when ``j < L``, ``p - window_left <= j``
    (unless window_left is -1) and ``j <= p + window_right`` (unless window_right is -1; causal
    means window_right 0) and, with ``document_ids`` (B, seq) and seq_q == seq_k, when both
    lie in the same document.
    """
    if causal:
        window_right = 0
    if document_ids is not None:
        device = document_ids.device
    elif key_lengths is not None:
        device = key_lengths.device
    if key_lengths is None:
        lengths = torch.full((1,), seq_k, dtype=torch.int64, device=device)
    else:
        lengths = key_lengths.to(device=device, dtype=torch.int64)
    key_pos = torch.arange(seq_k, device=device)[None, None, :]
    query_pos = (lengths[:, None] - seq_q + torch.arange(seq_q, device=device)[None, :])[:, :, None]
    visible = (key_pos < lengths[:, None, None]).expand(lengths.shape[0], seq_q, seq_k)
    if window_left >= 0:
        visible = visible & (key_pos >= query_pos - window_left)
    if window_right >= 0:
        visible = visible & (key_pos <= query_pos + window_right)
    visible = visible[:, None]
    if document_ids is not None:
        same_document = document_ids[:, :, None] == document_ids[:, None, :]
        visible = visible & same_document[:, None]
    return visible


def attention(q, k, v, scale=None, causal=True, window_left=-1, window_right=-1,
              document_ids=None, key_lengths=None, return_lse=False):
    """softmax(q k^T * scale + mask) v under :func:`flash_mask`, GQA by head groups.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). Returns the output in q's dtype and, with
    ``return_lse``, the natural-log logsumexp of each row's scaled scores, (B, H, Tq), fp32
    (fp64 for fp64 q). A row that sees no key gets output 0 and logsumexp -inf. Scores,
    softmax and the product with v are computed in fp32 (fp64 for fp64 inputs).
    """
    groups = q.shape[1] // k.shape[1]
    visible = flash_mask(q.shape[-2], k.shape[-2], causal, window_left, window_right,
                         document_ids, key_lengths, device=q.device)
    if not return_lse and key_lengths is None and q.shape[-2] == k.shape[-2]:
        # every row sees at least itself: SDPA with the mask, without the (B, H, T, T) fp32 scores
        return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups),
                                              attn_mask=visible, scale=scale)
    acc = compute_dtype(q.dtype)
    k, v = _repeat_kv(k, groups).to(acc), _repeat_kv(v, groups).to(acc)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(acc) @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - finite_lse[..., None])
    out = (probs @ v).to(q.dtype)
    return (out, lse) if return_lse else out


def default_rms_eps(dtype: torch.dtype) -> float:
    """RMSNorm's eps when none is given, as ``F.rms_norm`` picks it (torch 2.11-2.14, CPU and
    CUDA): the machine epsilon of the computation dtype, fp32 for half inputs."""
    return torch.finfo(compute_dtype(dtype)).eps


def rms_norm(x, weight=None, eps=None):
    """RMSNorm over the last dim, == ``F.rms_norm(x, (C,), weight, eps)``, in ``x.dtype``.

    ``eps=None`` is what torch does: the epsilon of the dtype the statistics are computed in
    (:func:`default_rms_eps`: fp32's for fp16/bf16/fp32 x, fp64's for fp64), not of x's dtype
    as torch's docstring says (bf16's would be 7.8e-3).
    """
    eps = default_rms_eps(x.dtype) if eps is None else eps
    acc = compute_dtype(x.dtype)
    w = None if weight is None else weight.to(acc)
    return F.rms_norm(x.to(acc), (x.shape[-1],), w, eps).to(x.dtype)


def add_rms_norm(x, residual, weight=None, eps=None):
    """Returns ``(rms_norm(x + residual), x + residual)`` (the sum in the promoted dtype)."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def rotary(x, cos, sin, interleaved=False):
    """Rotary embedding of x (B, T, H, D) with cos, sin (T, D/2), in x's compute dtype.

    Pairs (x1, x2) are the two halves of the head dim (rotate-half, Hugging Face and
    flash-attention's default) or, with ``interleaved``, neighbouring channels (GPT-J):
        (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
    nanochat rotates the other way, (x1 cos + x2 sin, -x1 sin + x2 cos): pass ``-sin``.
    """
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotary_qk_norm(q, k, cos, sin, scale=1.0, eps=None, interleaved=False):
    """``(rotary(rms_norm(q)) * scale, rotary(rms_norm(k)) * scale)``, parameter-free RMSNorm.

    q (B, T, H, D), k (B, T, Hkv, D), cos/sin (T, D/2). RMSNorm and rotation commute (a
    rotation keeps each pair's norm), so the order does not matter. Computed in fp32 (fp64 for
    fp64 inputs), returned in the dtypes of q and k.
    """
    acc = compute_dtype(q.dtype)
    cos, sin = cos.to(acc), sin.to(acc)
    out = []
    for x in (q, k):
        eps_x = default_rms_eps(x.dtype) if eps is None else eps
        normed = F.rms_norm(x.to(acc), (x.shape[-1],), eps=eps_x)
        out.append((rotary(normed, cos, sin, interleaved) * scale).to(x.dtype))
    return tuple(out)


def class_indices(target: torch.Tensor) -> torch.Tensor:
    """``target`` as int64 class indices, so that comparisons with ``ignore_index`` and the
    vocabulary size happen by value: torch compares a uint8 tensor with -100 by wrapping -100
    into uint8 (156), and ``>= 256`` into ``>= 0``. An ignore_index outside the target dtype's
    range therefore never matches. No copy for int64 targets."""
    return target if target.dtype == torch.int64 else target.to(torch.int64)


def cross_entropy(logits, target, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, weight=None, softcap=None,
                  return_z_loss=False):
    """Cross-entropy of rows of ``logits`` (..., V) against integer ``target`` (...).

    Per row i with x = logits_i, soft-capped first when ``softcap`` is c
    (x = c * tanh(x / c), as Gemma 2), lse = logsumexp(x), t = t_i, label smoothing s:
        loss_i = (1 - s) * (lse - x[t]) + s * (lse - mean(x)) + z * lse^2
    and 0 where t_i == ignore_index (compared by value whatever target's integer dtype).
    "mean" divides by the number of non-ignored rows (0 when every row is ignored, not NaN),
    "sum" adds, "none" returns the per-row losses in target's shape.

    Class weights w (``weight``, shape (V,)) give torch's weighted loss,
        ce_i = (1 - s) * w[t] * (lse - x[t]) + s / V * sum_j w[j] * (lse - x[j]),
    and "mean" = sum_i ce_i / sum_i w[t_i] + z * sum_i lse_i^2 / count (over non-ignored
    rows; the weighted part is 0 when sum_i w[t_i] is 0, where torch gives NaN): the z-loss
    is never class-weighted (as in Liger). ``return_z_loss`` returns ``(loss, z_term)`` with
    z_term = z * lse^2 reduced like the loss (unweighted) and detached: a value to log, whose
    gradient is already part of the loss's.
    """
    acc = compute_dtype(logits.dtype)
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab).to(acc)
    if softcap is not None:
        rows = softcap * torch.tanh(rows / softcap)
    flat_target = class_indices(target).reshape(-1)
    keep = flat_target != ignore_index
    count = keep.sum().clamp(min=1).to(acc)
    if weight is None and not return_z_loss:
        if not z_loss:
            # torch's fused op: same definition, ~1.3x faster forward on CPU (512 x 50304: 47 vs 62 ms)
            loss = F.cross_entropy(rows, flat_target, ignore_index=ignore_index,
                                   reduction="none", label_smoothing=label_smoothing)
        else:
            loss = cross_entropy_rows_formula(rows, flat_target, keep, label_smoothing, z_loss)
        if reduction == "none":
            return loss.reshape(target.shape)
        return loss.sum() if reduction == "sum" else loss.sum() / count

    class_weight = None if weight is None else weight.to(acc)
    ce = F.cross_entropy(rows, flat_target, weight=class_weight,
                         ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    z_term = torch.zeros_like(ce)
    if z_loss:
        z_term = torch.where(keep, z_loss * torch.logsumexp(rows, dim=-1).square(), z_term)
    if reduction == "none":
        loss, z_out = (ce + z_term).reshape(target.shape), z_term.reshape(target.shape)
    elif reduction == "sum":
        loss, z_out = ce.sum() + z_term.sum(), z_term.sum()
    else:
        if class_weight is None:
            ce_mean = ce.sum() / count
        else:
            safe_target = torch.where(keep, flat_target, torch.zeros_like(flat_target))
            total = torch.where(keep, class_weight[safe_target], torch.zeros((), dtype=acc)).sum()
            ce_mean = torch.where(total != 0, ce.sum() / torch.where(total != 0, total, 1.0),
                                  torch.zeros((), dtype=acc))
        z_out = z_term.sum() / count
        loss = ce_mean + z_out
    return (loss, z_out.detach()) if return_z_loss else loss


def cross_entropy_rows_formula(rows, flat_target, keep, label_smoothing, z_loss):
    """Per-row losses of :func:`cross_entropy` written out (0 at rows where ``keep`` is False)."""
    safe_target = torch.where(keep, class_indices(flat_target), 0)
    lse = torch.logsumexp(rows, dim=-1)
    picked = rows.gather(1, safe_target[:, None]).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - picked)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - rows.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(keep, loss, torch.zeros_like(loss))


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, z_loss=0.0, ce_weight=None,
                         softcap=None, return_z_loss=False):
    """``cross_entropy(x @ weight.T + bias, target)``; x (..., C), weight (V, C), bias (V,).

    ``ce_weight`` is cross_entropy's class ``weight``. A weight (and bias) in fp32 with
    bf16/fp16 x is cast to x's dtype for the product, as ``F.linear`` under autocast does.
    """
    logits = F.linear(x.reshape(-1, x.shape[-1]), weight.to(x.dtype),
                      None if bias is None else bias.to(x.dtype))
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing, z_loss,
                         ce_weight, softcap, return_z_loss)
