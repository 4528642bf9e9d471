"""Rotary embedding and parameter-free QK RMSNorm in one pass, forward and backward.

For each head row x of D features (D even) at position t, with pairs (x1, x2) = (x[i],
x[i + D/2]) (rotate-half, Hugging Face and flash-attention) or (x[2i], x[2i + 1])
(``interleaved``, GPT-J), i < D/2, and c = cos[t, i], s = sin[t, i]:

    rstd = 1 / sqrt(mean(x^2) + eps)
    n    = x * rstd                                   (RMSNorm, no weight)
    y    = scale * (n1 c - n2 s,  n1 s + n2 c)         (rotation by +theta)

RMSNorm and the rotation commute (a rotation keeps each pair's norm, so mean(x^2) is the
same before and after), which is why one pass does both. nanochat rotates by -theta and
normalises after: that is this op with ``-sin``. ``eps=None`` is torch's default for
``F.rms_norm`` (hence nanochat's): the epsilon of the dtype it computes in, fp32's for half
tensors (``reference.default_rms_eps``).

Backward, with dy the gradient of y: the transpose of a rotation is the rotation by -theta,

    g  = scale * (dy1 c + dy2 s,  -dy1 s + dy2 c)
    dx = rstd * (g - n * mean(g * n))

cos and sin get no gradient here: a call whose cos or sin requires grad is unsupported
(the "auto" backend runs the reference, which differentiates them; forcing "triton" raises).

Magnitudes: statistics in fp32. A row whose largest |x| exceeds 1 is divided by that
maximum before squaring, so mean(x^2) never overflows fp32 (rows up to fp32's and bf16's
largest finite values normalise correctly; the reference in fp32 gives 0 for |x| > ~1e19);
rows of |x| <= 1 are used as they are, so tiny rows keep eps's full weight. Zero rows give 0.

Memory traffic: the forward reads q, k (any strides: views of a fused qkv projection are
read in place) and cos/sin rows, and writes q', k' contiguous (B, T, H, D); nothing else is
saved. The backward reads q, k, dq', dk' once, recomputes rstd, and writes dq, dk. One
launch covers both tensors: program (b * T + t, j) takes a block of BLOCK_H heads of q
(j < the number of q blocks) or of k, with the whole head dim in registers, and loads the
position's cos/sin row once for all of them. No autotuning: a fixed heuristic keyed on D
and the head counts, so the bits never depend on timing.

Each op is a ``torch.library.custom_op`` with a fake implementation and autograd, so
``torch.compile(fullgraph=True)`` traces through it; eager calls use an autograd.Function
around the same launchers. A backward with ``create_graph=True`` (double backward) takes
its gradients from ``gptfast.reference`` with a graph (exact second derivatives).
"""

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from gptfast import reference
from gptfast.backend import interpreter_enabled
from gptfast.double_backward import creating_graph, reference_grads

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements (heads x head dim) per program: a few KB in flight, cos/sin reused across heads.
TILE = 2048
# Grid axis 1 (head blocks of q and k together) is limited to 65535 programs by CUDA.
_MAX_GRID_Y = 65535
_INTERPRET = interpreter_enabled()


# ----------------------------------------------------------------------------- kernels --

@triton.jit
def _pair_offsets(offs_i, half, stride_d, INTERLEAVED: tl.constexpr):
    """Offsets (in elements, int64) of the two members of each pair i."""
    if INTERLEAVED:
        first = 2 * offs_i
        second = first + 1
    else:
        first = offs_i
        second = offs_i + half
    return first.to(tl.int64) * stride_d, second.to(tl.int64) * stride_d


@triton.jit
def _normalised(x1, x2, inv_d, eps):
    """(rstd of the unscaled rows, rows pre-scaled by 1 / max|x| where that max exceeds 1,
    that factor): mean(x^2) of the pre-scaled rows cannot overflow, and
    x * rstd == (x * f) * (1 / sqrt(mean((x f)^2) + eps f^2)) for any f > 0."""
    big = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
    f = 1.0 / tl.maximum(big, 1.0)
    x1 = x1 * f[:, None]
    x2 = x2 * f[:, None]
    mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) * inv_d
    rstd_f = 1.0 / tl.sqrt(mean_sq + eps * f * f)
    return x1, x2, rstd_f, f


@triton.jit
def _fwd_heads(X, Y, x_base, y_base, sx_h, sx_d, heads, head_block, c, s, half, D,
               inv_d, eps, scale,
               INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """y for heads [head_block * BLOCK_H, ...) of one (b, t): one read of x, one write of y."""
    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < heads)[:, None] & (offs_i < half)[None, :]
    x_first, x_second = _pair_offsets(offs_i, half, sx_d, INTERLEAVED)
    y_first, y_second = _pair_offsets(offs_i, half, 1, INTERLEAVED)
    x_rows = X + x_base + offs_h.to(tl.int64)[:, None] * sx_h
    x1 = tl.load(x_rows + x_first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + x_second[None, :], mask=mask, other=0.0).to(tl.float32)
    x1, x2, rstd_f, _ = _normalised(x1, x2, inv_d, eps)
    k = (rstd_f * scale)[:, None]
    n1 = x1 * k
    n2 = x2 * k
    y_rows = Y + y_base + offs_h.to(tl.int64)[:, None] * D
    tl.store(y_rows + y_first[None, :], (n1 * c - n2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_rows + y_second[None, :], (n1 * s + n2 * c).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _program_position(COS, SIN, T, half, sc_t, sc_d, ss_t, ss_d, BLOCK_HALF: tl.constexpr):
    """(row = b * T + t, head block, b, t, cos row, sin row) of a program on the grid
    (B * T, head blocks); the tables as fp32 (1, BLOCK_HALF), 0 past D/2."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + t * sc_t + offs_i.to(tl.int64) * sc_d, mask=offs_i < half, other=0.0)
    s = tl.load(SIN + t * ss_t + offs_i.to(tl.int64) * ss_d, mask=offs_i < half, other=0.0)
    return row, block, b, t, c.to(tl.float32)[None, :], s.to(tl.float32)[None, :]


@triton.jit
def _rotary_qk_norm_fwd(
    Q, K, COS, SIN, QO, KO,
    T, H, HKV, half, D, inv_d, eps_q, eps_k, scale, q_blocks,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sc_t, sc_d, ss_t, ss_d,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    row, block, b, t, c, s = _program_position(COS, SIN, T, half, sc_t, sc_d, ss_t, ss_d,
                                               BLOCK_HALF)
    if block < q_blocks:
        _fwd_heads(Q, QO, b * sq_b + t * sq_t, row.to(tl.int64) * H * D, sq_h, sq_d, H, block,
                   c, s, half, D, inv_d, eps_q, scale, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    else:
        _fwd_heads(K, KO, b * sk_b + t * sk_t, row.to(tl.int64) * HKV * D, sk_h, sk_d, HKV,
                   block - q_blocks, c, s, half, D, inv_d, eps_k, scale,
                   INTERLEAVED, BLOCK_H, BLOCK_HALF)


@triton.jit
def _bwd_heads(X, DY, DX, x_base, dy_base, dx_base, sx_h, sx_d, sdy_h, sdy_d, heads, head_block,
               c, s, half, D, inv_d, eps, scale,
               INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """dx for heads [head_block * BLOCK_H, ...) of one (b, t): reads x and dy once, writes dx."""
    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_h64 = offs_h.to(tl.int64)[:, None]
    offs_i = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < heads)[:, None] & (offs_i < half)[None, :]
    x_first, x_second = _pair_offsets(offs_i, half, sx_d, INTERLEAVED)
    dy_first, dy_second = _pair_offsets(offs_i, half, sdy_d, INTERLEAVED)
    dx_first, dx_second = _pair_offsets(offs_i, half, 1, INTERLEAVED)
    x_rows = X + x_base + offs_h64 * sx_h
    dy_rows = DY + dy_base + offs_h64 * sdy_h
    x1 = tl.load(x_rows + x_first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + x_second[None, :], mask=mask, other=0.0).to(tl.float32)
    dy1 = tl.load(dy_rows + dy_first[None, :], mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(dy_rows + dy_second[None, :], mask=mask, other=0.0).to(tl.float32)
    x1, x2, rstd_f, f = _normalised(x1, x2, inv_d, eps)
    n1 = x1 * rstd_f[:, None]
    n2 = x2 * rstd_f[:, None]
    # through the rotation: its transpose, the rotation by -theta, then the scale
    g1 = (dy1 * c + dy2 * s) * scale
    g2 = (dy2 * c - dy1 * s) * scale
    dot = (tl.sum(g1 * n1, axis=1) + tl.sum(g2 * n2, axis=1)) * inv_d
    # through the norm: rstd = rstd_f * f; rstd_f first, so a tiny f cannot underflow it
    dx1 = ((g1 - n1 * dot[:, None]) * rstd_f[:, None]) * f[:, None]
    dx2 = ((g2 - n2 * dot[:, None]) * rstd_f[:, None]) * f[:, None]
    dx_rows = DX + dx_base + offs_h64 * D
    tl.store(dx_rows + dx_first[None, :], dx1.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_rows + dx_second[None, :], dx2.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_qk_norm_bwd(
    Q, K, DQO, DKO, COS, SIN, DQ, DK,
    T, H, HKV, half, D, inv_d, eps_q, eps_k, scale, q_blocks,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
    sdq_b, sdq_t, sdq_h, sdq_d, sdk_b, sdk_t, sdk_h, sdk_d, sc_t, sc_d, ss_t, ss_d,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """The forward's grid; ``q_blocks`` is 0 when q needs no gradient (programs take k only),
    and the grid ends at q's blocks when k needs none."""
    row, block, b, t, c, s = _program_position(COS, SIN, T, half, sc_t, sc_d, ss_t, ss_d,
                                               BLOCK_HALF)
    if block < q_blocks:
        _bwd_heads(Q, DQO, DQ, b * sq_b + t * sq_t, b * sdq_b + t * sdq_t,
                   row.to(tl.int64) * H * D, sq_h, sq_d, sdq_h, sdq_d, H, block,
                   c, s, half, D, inv_d, eps_q, scale, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    else:
        _bwd_heads(K, DKO, DK, b * sk_b + t * sk_t, b * sdk_b + t * sdk_t,
                   row.to(tl.int64) * HKV * D, sk_h, sk_d, sdk_h, sdk_d, HKV, block - q_blocks,
                   c, s, half, D, inv_d, eps_k, scale, INTERLEAVED, BLOCK_H, BLOCK_HALF)


# ---------------------------------------------------------------------------- launchers --

def _resolved_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    return reference.default_rms_eps(dtype) if eps is None else float(eps)


def _blocks(head_dim: int, heads: int, kv_heads: int) -> Tuple[int, int, int]:
    """(BLOCK_HALF, BLOCK_H, num_warps) for one launch."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = max(1, min(triton.next_power_of_2(max(heads, kv_heads, 1)), TILE // (2 * block_half)))
    elements = 2 * block_half * block_h
    num_warps = max(1, min(8, elements // 256))
    return block_half, block_h, num_warps


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _new_bthd(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def rotary_qk_norm_forward(q, k, cos, sin, scale, eps, interleaved):
    """(q', k'), contiguous (B, T, H, D) / (B, T, Hkv, D) in the dtypes of q and k."""
    B, T, H, D = q.shape
    hkv = k.shape[2]
    qo, ko = _new_bthd(q), _new_bthd(k)
    if B * T == 0 or H + hkv == 0:
        return qo, ko
    block_half, block_h, num_warps = _blocks(D, H, hkv)
    q_blocks, k_blocks = triton.cdiv(H, block_h), triton.cdiv(hkv, block_h)
    with _device_guard(q):
        _rotary_qk_norm_fwd[(B * T, q_blocks + k_blocks)](
            q, k, cos, sin, qo, ko,
            T, H, hkv, D // 2, D, 1.0 / D, _resolved_eps(eps, q.dtype), _resolved_eps(eps, k.dtype),
            float(scale), q_blocks,
            *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
            INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
        )
    return qo, ko


def rotary_qk_norm_backward(dqo, dko, q, k, cos, sin, scale, eps, interleaved, need_q, need_k):
    """(dq or None, dk or None), contiguous, in the dtypes of q and k. ``dqo``/``dko`` None:
    no gradient reached that output (its input then gets zeros, if it needs a gradient)."""
    B, T, H, D = q.shape
    hkv = k.shape[2]
    dq = (torch.zeros_like(q, memory_format=torch.contiguous_format) if dqo is None
          else _new_bthd(q)) if need_q else None
    dk = (torch.zeros_like(k, memory_format=torch.contiguous_format) if dko is None
          else _new_bthd(k)) if need_k else None
    do_q, do_k = need_q and dqo is not None, need_k and dko is not None
    if B * T == 0 or not (do_q or do_k):
        return dq, dk
    block_half, block_h, num_warps = _blocks(D, H, hkv)
    q_blocks = triton.cdiv(H, block_h) if do_q else 0
    k_blocks = triton.cdiv(hkv, block_h) if do_k else 0
    if q_blocks + k_blocks == 0:
        return dq, dk
    # a tensor that is never touched stands in for an absent one: the kernel takes both
    dqo_, dq_ = (dqo, dq) if do_q else (dko, dk)
    dko_, dk_ = (dko, dk) if do_k else (dqo, dq)
    with _device_guard(q):
        _rotary_qk_norm_bwd[(B * T, q_blocks + k_blocks)](
            q, k, dqo_, dko_, cos, sin, dq_, dk_,
            T, H, hkv, D // 2, D, 1.0 / D, _resolved_eps(eps, q.dtype), _resolved_eps(eps, k.dtype),
            float(scale), q_blocks,
            *q.stride(), *k.stride(), *dqo_.stride(), *dko_.stride(), *cos.stride(), *sin.stride(),
            INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
        )
    return dq, dk


# --------------------------------------------- custom ops: what torch.compile traces --

@torch.library.custom_op("gptfast::rotary_qk_norm_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                scale: float, eps: Optional[float], interleaved: bool
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    return rotary_qk_norm_forward(q, k, cos, sin, scale, eps, interleaved)


@_forward_op.register_fake
def _(q, k, cos, sin, scale, eps, interleaved):
    return _new_bthd(q), _new_bthd(k)


@torch.library.custom_op("gptfast::rotary_qk_norm_bwd", mutates_args=())
def _backward_op(dqo: Optional[torch.Tensor], dko: Optional[torch.Tensor], q: torch.Tensor,
                 k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float,
                 eps: Optional[float], interleaved: bool, need_q: bool, need_k: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk); one not asked for comes back empty (the schema has no optional returns)."""
    dq, dk = rotary_qk_norm_backward(dqo, dko, q, k, cos, sin, scale, eps, interleaved,
                                     need_q, need_k)
    return (q.new_empty((0,)) if dq is None else dq, k.new_empty((0,)) if dk is None else dk)


@_backward_op.register_fake
def _(dqo, dko, q, k, cos, sin, scale, eps, interleaved, need_q, need_k):
    return (_new_bthd(q) if need_q else q.new_empty((0,)),
            _new_bthd(k) if need_k else k.new_empty((0,)))


def _grads(ctx, dqo, dko, backward):
    """(dq, dk) from what forward saved; ``backward`` is the custom op or the launcher."""
    q, k, cos, sin = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if creating_graph():  # double backward: exact, through the reference with a graph
        def fn(q_, k_):
            return reference.rotary_qk_norm(q_, k_, cos, sin, ctx.scale, ctx.eps, ctx.interleaved)
        dq, dk = reference_grads(fn, (q, k), (need_q, need_k), (dqo, dko))
        zeros = (lambda t, g: torch.zeros_like(t) if g is None else g)
        return (zeros(q, dq) if need_q else None), (zeros(k, dk) if need_k else None)
    dq, dk = backward(dqo, dko, q, k, cos, sin, ctx.scale, ctx.eps, ctx.interleaved,
                      need_q, need_k)
    return (dq if need_q else None), (dk if need_k else None)


def _save(ctx, outputs, q, k, cos, sin, scale, eps, interleaved):
    ctx.save_for_backward(q, k, cos, sin)
    ctx.scale, ctx.eps, ctx.interleaved = scale, eps, interleaved
    # as the reference: k' requires grad only if k does (q' likewise)
    for out, needed in zip(outputs, ctx.needs_input_grad[:2]):
        if not needed:
            ctx.mark_non_differentiable(out)


def _setup_context(ctx, inputs, output):
    _save(ctx, output, *inputs)


def _op_backward(ctx, dqo, dko):
    return (*_grads(ctx, dqo, dko, _backward_op), None, None, None, None, None)


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class _RotaryQKNorm(torch.autograd.Function):
    """The eager path: the custom op's launchers without the dispatcher's per-call cost."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, scale, eps, interleaved):
        outputs = rotary_qk_norm_forward(q, k, cos, sin, scale, eps, interleaved)
        _save(ctx, outputs, q, k, cos, sin, scale, eps, interleaved)
        return outputs

    @staticmethod
    def backward(ctx, dqo, dko):
        return (*_grads(ctx, dqo, dko, rotary_qk_norm_backward), None, None, None, None, None)


# ---------------------------------------------------------------------- public entries --

def rotary_qk_norm(q, k, cos, sin, scale=1.0, eps=None, interleaved=False):
    """(q', k') as ``gptfast.reference.rotary_qk_norm``; arguments checked by
    ``gptfast.functional``. Outputs are contiguous (B, T, H, D) whatever the input strides."""
    scale = float(scale)
    eps = None if eps is None else float(eps)
    interleaved = bool(interleaved)
    if torch.compiler.is_compiling():
        return tuple(_forward_op(q, k, cos, sin, scale, eps, interleaved))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RotaryQKNorm.apply(q, k, cos, sin, scale, eps, interleaved)
    return rotary_qk_norm_forward(q, k, cos, sin, scale, eps, interleaved)


def rotary_qk_norm_unsupported(q, k, cos, sin, scale=1.0, eps=None, interleaved=False):
    """None when the kernel handles this call, else why not."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} (the kernel takes float32, float16, bfloat16)"
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return ("cos/sin require grad: the kernel gives no gradient for the rotary tables "
                "(the reference backend does; pass cos.detach(), sin.detach() to use the kernel)")
    if q.device.type == "cuda" and _INTERPRET:
        return ("the kernels were defined for the CPU interpreter (TRITON_INTERPRET=1 when "
                "gptfast.kernels.rotary was imported)")
    heads, kv_heads = q.shape[2], k.shape[2]
    block_h = _blocks(q.shape[3], heads, kv_heads)[1]
    if triton.cdiv(heads, block_h) + triton.cdiv(kv_heads, block_h) > _MAX_GRID_Y:
        return f"{heads} + {kv_heads} heads take more head blocks than one launch's grid holds"
    return None
