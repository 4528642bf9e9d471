"""The public ops: argument checks, then one dispatch point per op.

Each function validates its arguments the same way on every backend (ValueError or
TypeError naming the argument, never a crash inside a kernel), asks ``gptfast.backend``
which implementation runs this call, and runs it. Triton kernels are declared below with
``register_kernel``, one line per op, as they land; ops without a kernel run the reference
implementation from ``gptfast.reference``.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import reference
from .backend import choose, register_kernel, registered_kernel

# Triton kernels, one line per op: "module:function" entries, imported on first use.
_LN, _CE = "gptfast.kernels.layernorm", "gptfast.kernels.cross_entropy"
_ATTN = "gptfast.kernels.attention"
register_kernel("layer_norm", f"{_LN}:layer_norm", f"{_LN}:layer_norm_unsupported")
register_kernel("add_layer_norm", f"{_LN}:add_layer_norm", f"{_LN}:add_layer_norm_unsupported")
register_kernel("rms_norm", f"{_LN}:rms_norm", f"{_LN}:rms_norm_unsupported")
register_kernel("add_rms_norm", f"{_LN}:add_rms_norm", f"{_LN}:add_rms_norm_unsupported")
register_kernel("causal_attention", f"{_ATTN}:causal_attention", f"{_ATTN}:causal_attention_unsupported")
register_kernel("attention", f"{_ATTN}:attention", f"{_ATTN}:attention_unsupported")
register_kernel("cross_entropy", f"{_CE}:cross_entropy", f"{_CE}:cross_entropy_unsupported")
register_kernel("linear_cross_entropy", f"{_CE}:linear_cross_entropy",
                f"{_CE}:linear_cross_entropy_unsupported")
register_kernel("rotary_qk_norm", "gptfast.kernels.rotary:rotary_qk_norm",
                "gptfast.kernels.rotary:rotary_qk_norm_unsupported")

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- checks --

def _tensor(name, value, floating=True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _same_device(reference_name, reference_tensor, **others):
    for name, value in others.items():
        if value is not None and value.device != reference_tensor.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference_name} is on {reference_tensor.device}"
            )


def _number(name, value, minimum=None, maximum=None, allow_equal_min=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):  # nan passes every comparison below
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value < minimum or (value == minimum and not allow_equal_min)):
        bound = ">=" if allow_equal_min else ">"
        raise ValueError(f"{name} must be {bound} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return float(value)


def _norm_params(x, weight, bias, eps):
    features = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        _tensor(name, param)
        if param.shape != (features,):
            raise ValueError(
                f"{name} must have shape ({features},) to match the last dim of x, "
                f"got {tuple(param.shape)}"
            )
    _same_device("x", x, weight=weight, bias=bias)
    _number("eps", eps, minimum=0.0, allow_equal_min=False)


def _check_layer_norm(x, weight, bias, eps):
    _tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    _norm_params(x, weight, bias, eps)


# uint64 class indices above 2**63 have no int64 value (2**64 - 100 would become -100, the
# default ignore_index); every other integer dtype widens to int64 exactly.
_UINT64 = getattr(torch, "uint64", None)
# Unsigned types beyond uint8 lack most CPU ops (comparisons included) in torch.
_UNSIGNED_WIDE = {getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)}
_INT64 = torch.iinfo(torch.int64)


def _checked_target(target, rows, logits_name):
    _tensor("target", target, floating=False)
    if target.dtype.is_complex or target.dtype == torch.bool or target.is_floating_point():
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if _UINT64 is not None and target.dtype == _UINT64:
        raise TypeError(f"target dtype {target.dtype} is not supported (its values above 2**63 "
                        f"have no int64 value); pass int64 class indices")
    if target.numel() != rows:
        raise ValueError(
            f"target must have one class index per row of {logits_name} ({rows} rows), "
            f"got shape {tuple(target.shape)}"
        )
    # every backend compares class indices with ignore_index and V by value, in int64
    return reference.class_indices(target)


def _check_target_range(target, vocab, ignore_index):
    """Data-dependent range check of int64 ``target`` (see ``reference.class_indices``: a
    narrower dtype would wrap ignore_index and vocab into its range); skipped while
    torch.compile traces (kernels check inside) and for meta tensors (no values to check; the
    reference ops run on them for shapes)."""
    if target.numel() == 0 or target.is_meta or torch.compiler.is_compiling():
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise ValueError(
            f"target holds class index {value}, outside [0, {vocab}) and not "
            f"ignore_index={ignore_index}"
        )


def _check_loss_options(ignore_index, reduction, label_smoothing, z_loss):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64.min <= ignore_index <= _INT64.max:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _number("label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)
    _number("z_loss", z_loss, minimum=0.0)


def _check_class_weight(name, weight, vocab, device):
    """Per-class loss weights as F.cross_entropy's ``weight``: floating, (V,), on the device."""
    if weight is None:
        return
    _tensor(name, weight)
    if weight.shape != (vocab,):
        raise ValueError(f"{name} must have shape ({vocab},), one weight per class, "
                         f"got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the logits are on {device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} (class weights) must not require grad: the losses are not "
                         f"differentiated with respect to it (as F.cross_entropy's weight); "
                         f"pass {name}.detach()")


def _check_new_loss_options(softcap, return_z_loss):
    if softcap is not None:
        _number("softcap", softcap, minimum=0.0, allow_equal_min=False)
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {type(return_z_loss).__name__}")


# -------------------------------------------------------------------------------- ops --

def _run(op, device, args, triton_options=None):
    """Run ``op`` on the backend chosen for this call; ``triton_options`` go to the kernel only."""
    backend, _ = choose(op, device, args)
    if backend == "triton":
        return registered_kernel(op).function(*args, **(triton_options or {}))
    return getattr(reference, op)(*args)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x, == ``F.layer_norm(x, (C,), weight, bias, eps)``.

    Returns ``x.dtype``; weight/bias may be fp32 with half-precision x (as under autocast).
    Rows holding inf or NaN give NaN on every backend. A finite row whose variance overflows
    fp32 (|x| beyond about 1e19) normalises to 0 on the Triton backend (the output is the
    bias); torch's CPU kernel, hence the reference backend on CPU, gives NaN for such rows.
    """
    _check_layer_norm(x, weight, bias, eps)
    return _run("layer_norm", x.device, (x, weight, bias, eps))


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """Returns ``(layer_norm(x + residual), x + residual)`` in one pass where a kernel exists.

    Use in pre-norm blocks: ``h, stream = add_layer_norm(branch_out, stream, w, b)``.
    """
    _tensor("residual", residual)
    _check_layer_norm(x, weight, bias, eps)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    _same_device("x", x, residual=residual)
    return _run("add_layer_norm", x.device, (x, residual, weight, bias, eps))


def _check_rms_norm(x, weight, eps):
    _tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    _norm_params(x, weight, None, 1.0)
    if eps is not None:
        _number("eps", eps, minimum=0.0, allow_equal_min=False)


def rms_norm(x, weight=None, eps=None):
    """RMSNorm over the last dim of x, == ``F.rms_norm(x, (C,), weight, eps)``.

    ``eps=None`` is torch's default: the epsilon of fp32 for fp16/bf16/fp32 x (torch computes
    in fp32), of fp64 for fp64 x (``reference.default_rms_eps``). Returns ``x.dtype``;
    weight may be fp32 with half-precision x. Statistics in fp32 on every backend: a finite
    row whose sum of squares overflows fp32 normalises to 0 (as ``F.rms_norm`` in fp32), an
    inf entry gives NaN there and 0 elsewhere in its row, a NaN gives a NaN row.
    """
    _check_rms_norm(x, weight, eps)
    return _run("rms_norm", x.device, (x, weight, eps))


def add_rms_norm(x, residual, weight=None, eps=None):
    """Returns ``(rms_norm(x + residual), x + residual)`` in one pass where a kernel exists.

    The sum (and the norm) are in the promoted dtype of x and residual; ``eps=None`` as in
    :func:`rms_norm`, for that dtype.
    """
    _tensor("residual", residual)
    _check_rms_norm(x, weight, eps)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    _same_device("x", x, residual=residual)
    return _run("add_rms_norm", x.device, (x, residual, weight, eps))


def rotary_qk_norm(q, k, cos, sin, *, scale=1.0, eps=None, interleaved=False):
    """Parameter-free RMSNorm, then rotary, then ``* scale``, on q and k: returns (q', k').

    q: (B, T, H, D), k: (B, T, Hkv, D), D even; cos, sin: (T, D/2) as Hugging Face and
    flash-attention lay them out (rotate-half pairs (x[i], x[i + D/2]); ``interleaved``
    pairs (x[2i], x[2i + 1])). Each pair goes to (x1 cos - x2 sin, x1 sin + x2 cos).
    nanochat rotates by -theta: its ``apply_rotary_emb(x, cos, sin)`` is this with ``-sin``.
    See ``gptfast.reference.rotary_qk_norm``. The Triton kernel (``gptfast.kernels.rotary``)
    gives no gradient to cos/sin: calls where they require grad run on the reference backend.
    """
    for name, t in (("q", q), ("k", k)):
        _tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    (b, t, _, d), (bk, tk, _, dk) = q.shape, k.shape
    if (bk, tk, dk) != (b, t, d):
        raise ValueError(f"k must have q's batch, seq and head_dim {(b, t, d)}, got {(bk, tk, dk)}")
    if d == 0 or d % 2:
        raise ValueError(f"head_dim must be even and >= 2 for rotary pairs, got {d}")
    for name, table in (("cos", cos), ("sin", sin)):
        _tensor(name, table)
        if table.shape != (t, d // 2):
            raise ValueError(f"{name} must have shape (seq, head_dim / 2) = {(t, d // 2)}, "
                             f"got {tuple(table.shape)}")
    _same_device("q", q, k=k, cos=cos, sin=sin)
    scale = _number("scale", scale)
    if eps is not None:
        eps = _number("eps", eps, minimum=0.0, allow_equal_min=False)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    return _run("rotary_qk_norm", q.device, (q, k, cos, sin, scale, eps, interleaved))


def _check_document_ids(document_ids, batch, seq, device):
    _tensor("document_ids", document_ids, floating=False)
    dtype = document_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"document_ids must be an integer tensor, got dtype {dtype}")
    if dtype in _UNSIGNED_WIDE:
        raise TypeError(f"document_ids dtype {dtype} is not supported (torch has no comparison "
                        f"ops for it); pass int32 or int64 ids")
    if document_ids.shape != (batch, seq):
        raise ValueError(f"document_ids must have shape (batch, seq) = {(batch, seq)} to match q, "
                         f"got {tuple(document_ids.shape)}")
    if document_ids.device != device:
        raise ValueError(f"document_ids is on {document_ids.device} but q is on {device}")
    # Non-decreasing is checked on eager CPU tensors only: on CUDA the check would block on
    # the device every call, so there it is the caller's contract.
    if document_ids.device.type == "cpu" and seq > 1 and not torch.compiler.is_compiling():
        steps = document_ids[:, 1:] < document_ids[:, :-1]
        if bool(steps.any()):
            row, pos = (int(i) for i in steps.nonzero()[0])
            raise ValueError(
                f"document_ids must be non-decreasing along the sequence (documents packed in "
                f"order), but document_ids[{row}, {pos + 1}] < document_ids[{row}, {pos}]"
            )


def _check_window(window):
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be None or an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (a query always sees itself), got {window}")
    return int(window)


def _check_qkv(q, k, v):
    """q, k, v: floating 4-D (batch, heads, seq, head_dim) tensors of one dtype, k and v alike."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")


def _check_heads_and_scale(q, k, v, scale):
    """Whole kv head groups, a head dim, one device; returns scale as a float (or None)."""
    h, hk, d = q.shape[1], k.shape[1], q.shape[-1]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hk})")
    if d == 0:
        raise ValueError("head_dim of q must be at least 1")
    _same_device("q", q, k=k, v=v)
    if scale is not None:
        scale = _number("scale", scale, minimum=0.0, allow_equal_min=False)
    return scale


def causal_attention(q, k, v, scale=None, *, document_ids=None, window=None):
    """Causal softmax attention, == ``SDPA(q, k, v, is_causal=True, scale=scale)``.

    q: (B, H, T, D); k, v: (B, Hkv, T, D) with H % Hkv == 0 (GQA/MQA: query head h reads
    kv head h // (H // Hkv), as SDPA's enable_gqa). scale defaults to 1/sqrt(D).

    ``document_ids``: integer (B, T), non-decreasing along T (documents packed in order):
    query i attends key j only if ``document_ids[b, j] == document_ids[b, i]``. Checked to
    be non-decreasing on CPU tensors outside torch.compile; elsewhere (CUDA) that is the
    caller's contract, unchecked because a check would synchronise with the device on every
    call: decreasing ids give wrong attention, never an out-of-bounds access.
    ``window``: int >= 1, query i attends key j only if ``i - window < j <= i``; a window
    >= T is plain causal attention. Both together: both conditions. With both None this is
    today's plain causal op, bit for bit. Equivalent to SDPA with the boolean mask of
    ``gptfast.reference.attention_mask``; every row sees at least itself.
    """
    _check_qkv(q, k, v)
    (b, h, t, d), (bk, hk, tk, dk) = q.shape, k.shape
    if bk != b or tk != t or dk != d:
        raise ValueError(
            f"k must have q's batch, seq and head_dim {(b, t, d)}, got {(bk, tk, dk)} "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    scale = _check_heads_and_scale(q, k, v, scale)
    if document_ids is not None:
        _check_document_ids(document_ids, b, t, q.device)
    if window is not None:
        window = _check_window(window)
        if window >= t:  # sees every earlier position: plain causal
            window = None
    if document_ids is None and window is None:
        return _run("causal_attention", q.device, (q, k, v, scale))
    return _run("causal_attention", q.device, (q, k, v, scale, document_ids, window))


def _check_window_side(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (-1 for unlimited), got {type(value).__name__}")
    if value < -1:
        raise ValueError(f"{name} must be >= 0, or -1 for unlimited, got {value}")
    return int(value)


def attention(q, k, v, scale=None, *, causal=True, window_left=-1, window_right=-1,
              document_ids=None, key_lengths=None, return_lse=False):
    """Softmax attention with flash-attention's masks; the op behind ``gptfast.flash_attn_interface``.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), H % Hkv == 0 (query head h reads kv head
    h // (H // Hkv)). Query i sits at position ``L - Tq + i`` (aligned to the bottom right)
    with L = ``key_lengths[b]`` (int32/int64 (B,), keys from L on are unused) or Tk; it sees
    key j when ``position - window_left <= j <= position + window_right``, -1 meaning
    unlimited on that side and ``causal`` meaning window_right = 0. ``document_ids`` (B, T),
    non-decreasing, only with Tq == Tk: also the same document. scale defaults to 1/sqrt(D).

    Returns the output (B, H, Tq, D) in q's dtype, and with ``return_lse`` also the natural-log
    logsumexp of each row's scaled scores, (B, H, Tq) fp32 (differentiable). A row that
    sees no key gets output 0 and logsumexp -inf. See ``gptfast.reference.attention``.
    """
    _check_qkv(q, k, v)
    (b, h, tq, d), (bk, hk, tk, dk) = q.shape, k.shape
    if bk != b or dk != d:
        raise ValueError(f"k must have q's batch and head_dim {(b, d)}, got {(bk, dk)}")
    scale = _check_heads_and_scale(q, k, v, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    window_left = _check_window_side("window_left", window_left)
    window_right = 0 if causal else _check_window_side("window_right", window_right)
    if document_ids is not None:
        if tq != tk:
            raise ValueError(f"document_ids needs as many queries as keys, got Tq={tq}, Tk={tk}")
        _check_document_ids(document_ids, b, tq, q.device)
    if key_lengths is not None:
        _tensor("key_lengths", key_lengths, floating=False)
        if key_lengths.dtype not in (torch.int32, torch.int64) or key_lengths.shape != (b,):
            raise ValueError(f"key_lengths must be an int32/int64 tensor of shape ({b},), got "
                             f"{key_lengths.dtype} {tuple(key_lengths.shape)}")
        _same_device("q", q, key_lengths=key_lengths)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    args = (q, k, v, scale, causal, window_left, window_right, document_ids, key_lengths,
            return_lse)
    return _run("attention", q.device, args)


def cross_entropy(logits, target, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, *, weight=None, softcap=None,
                  return_z_loss=False, keep_logits=True):
    """Cross-entropy of logits (..., V) against class indices target (...), like F.cross_entropy.

    ``target``: any integer dtype but uint64, compared with ``ignore_index`` and V by value
    (an ignore_index outside the target dtype's range never matches); bool and uint64 raise
    TypeError.

    ``reduction``: "mean" over non-ignored rows (0 if all are ignored), "sum", or "none"
    (per-row losses in target's shape, 0 at ignored rows). ``z_loss`` adds
    ``z_loss * logsumexp^2`` per row (Liger's ``lse_square_scale``). The loss is fp32 (fp64
    for fp64 logits).

    Liger/torch options (keyword-only): ``weight`` (V,) per-class weights as
    F.cross_entropy's (a weighted "mean" divides by the summed weights of the counted rows;
    the z-loss term is not weighted); ``softcap`` c > 0 caps the logits to
    ``c * tanh(logits / c)`` first (Gemma 2), inside the kernels, backward included;
    ``return_z_loss=True`` returns ``(loss, z_loss_term)``, the second reduced like the loss
    and detached (the loss already holds it). See ``gptfast.reference.cross_entropy``.

    Memory: by default the logits are left as they are and backward allocates their N x V
    gradient, on every backend. ``keep_logits=False`` promises that nothing reads the logits
    after this call (no second loss on them, no ``logits ** 2`` afterwards, not returned to
    a caller who reads them): the Triton backend then writes the gradient into the logits
    buffer during the forward, so the loss costs O(N) extra memory, and the logits hold
    gradients afterwards. Even then it writes only where no answer it can see would change:
    logits made by an op (never a leaf or a view of one), with rows that do not overlap in
    memory (not ``expand``ed); a second gptfast loss on logits it overwrote raises
    RuntimeError, and so do a node that saved the logits before the loss and a second
    backward (``retain_graph=True``), when they reach backward. A later read by other code
    cannot be seen: that part of the promise is the caller's.
    """
    _tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (N, V) or (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    target = _checked_target(target, logits.numel() // vocab, "logits")
    _same_device("logits", logits, target=target)
    _check_loss_options(ignore_index, reduction, label_smoothing, z_loss)
    _check_class_weight("weight", weight, vocab, logits.device)
    _check_new_loss_options(softcap, return_z_loss)
    if not isinstance(keep_logits, bool):
        raise TypeError(f"keep_logits must be a bool, got {type(keep_logits).__name__}")
    _check_target_range(target, vocab, ignore_index)
    args = (logits, target, int(ignore_index), reduction, float(label_smoothing), float(z_loss),
            weight, None if softcap is None else float(softcap), return_z_loss)
    return _run("cross_entropy", logits.device, args, {"keep_logits": keep_logits})


_HALF = (torch.float16, torch.bfloat16)


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, *, ce_weight=None, softcap=None,
                         return_z_loss=False):
    """``cross_entropy(x @ weight.T + bias, target)`` without materialising N x V where a kernel exists.

    x: (..., C); weight: (V, C); bias: (V,) or None; target: (...) with one index per row of x.
    ``ce_weight``, ``softcap``, ``return_z_loss``: cross_entropy's ``weight``, ``softcap``,
    ``return_z_loss`` (Liger's names).

    Dtypes: weight (and bias) have x's dtype, or are fp32 with bf16/fp16 x (an fp32 lm_head
    under autocast): the product then runs in x's dtype with fp32 accumulation, as F.linear
    under autocast, the statistics in fp32; the gradient of x comes back in x's dtype, those of
    weight and bias in theirs (accumulated in fp32 on the Triton backend).
    """
    _tensor("x", x)
    _tensor("weight", weight)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (N, C) or (..., C) with C >= 1, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be (V, C) with C = {x.shape[-1]} (the last dim of x), got {tuple(weight.shape)}"
        )
    mixed = x.dtype in _HALF and weight.dtype == torch.float32
    if weight.dtype != x.dtype and not mixed:
        raise TypeError(f"weight must have x's dtype {x.dtype} (or float32 with bfloat16/float16 "
                        f"x), got {weight.dtype}")
    vocab = weight.shape[0]
    if bias is not None:
        _tensor("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    target = _checked_target(target, x.numel() // x.shape[-1], "x")
    _same_device("x", x, weight=weight, bias=bias, target=target)
    _check_loss_options(ignore_index, reduction, label_smoothing, z_loss)
    _check_class_weight("ce_weight", ce_weight, vocab, x.device)
    _check_new_loss_options(softcap, return_z_loss)
    _check_target_range(target, vocab, ignore_index)
    args = (x, weight, target, bias, int(ignore_index), reduction, float(label_smoothing),
            float(z_loss), ce_weight, None if softcap is None else float(softcap), return_z_loss)
    return _run("linear_cross_entropy", x.device, args)
