"""LayerNorm and RMSNorm over the last dimension, forward and backward, with an optional fused
residual add.

For a row x of C features (statistics always in fp32, whatever the activation dtype):

    mean = sum(x) / C                     (LayerNorm; RMSNorm takes mean = 0)
    var  = sum((x - mean)^2) / C          (biased, as torch; RMSNorm: the mean square)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * w + b                   (w = 1, b = 0 when absent; RMSNorm has no b)

Backward, with g = dy * w:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMSNorm: without the mean(g) term)
    dw = sum over rows of dy * xhat
    db = sum over rows of dy

A LayerNorm is an RMSNorm of the centred row x - mean, and the mean(g) term is the gradient
of that centring, so both norms are the same kernels: the constexpr ``CENTER`` switches the
mean (and its term in dx) on for LayerNorm and off for RMSNorm, whose mean is never computed,
stored or loaded. A missing weight or bias is a constexpr too (HAS_W, HAS_B): nothing is
allocated or loaded for it (nanochat's RMSNorm has no weight).

``add_layer_norm(x, r)`` / ``add_rms_norm(x, r)`` normalise s = x + r (taken in the promoted
dtype of x and r) and also return s; the backward adds the gradient flowing into s directly
(ds_out) to the one coming through the norm, and hands that one gradient to both x and r,
each in its own dtype.

RMSNorm's ``eps=None`` is torch's default, the epsilon of the computation dtype (fp32's for
fp16/bf16/fp32 x, ``reference.default_rms_eps``), resolved here before the launch. A row whose sum of squares
overflows fp32 (|x| around 1e19 / sqrt(C) and beyond) gets rstd = 0, so y = 0 and dx = 0
for it, as ``F.rms_norm`` computing in fp32 (the reference backend) gives; a row holding inf
or NaN gives NaN where torch does.

Memory traffic, which is all that matters for this op:
- forward reads x (and r) once and writes y (and s), plus 8 bytes a row for mean/rstd;
  only mean and rstd are saved for backward (besides the inputs).
- backward reads x (or s), dy (and ds_out) once and writes dx (and dr); dw/db are summed
  per program in fp32 registers and written as one (programs, C) fp32 partial per program,
  then a small kernel adds the partials in a fixed order and casts to the parameter dtype:
  deterministic bits, no atomics.

Rows up to ``MAX_FUSED_C`` features (next power of two; ``MAX_FUSED_BWD_C`` in backward, which
holds more per element) live in registers: one pass over memory. Longer rows use looped kernels (forward: chunked Welford/Chan statistics, then a
second pass; backward: two passes and fp32 partials updated in global memory).

Block sizes come from fixed heuristics keyed on C rather than autotuning: the reduction
order (hence the bits of y, dx, dw) depends on the tile shape, and autotuning picks tiles
by timing, which would make results differ between processes.

Each op is a ``torch.library.custom_op`` ("gptfast::layer_norm_fwd", "gptfast::rms_norm_fwd"
...; one backward op, "gptfast::layer_norm_bwd", for both norms) with a fake
implementation and autograd, so ``torch.compile(fullgraph=True)`` traces through it.
A backward with ``create_graph=True`` (double backward) evaluates the backward formulas
above with differentiable torch ops instead of the kernel, so second derivatives are exact.
"""

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from gptfast import reference
from gptfast.double_backward import creating_graph

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest power-of-two row (in elements) kept whole in registers. 16384 fp32 is 64 KB a
# row: 32 values a thread at 16 warps; beyond that registers spill, so rows loop instead.
MAX_FUSED_C = 16384
# Backward keeps x, dy, w and two accumulators per element: rows past 8192 loop (a 16384
# row in registers spills on sm_90 even at 32 warps: 64 registers a thread, 150-700 B).
MAX_FUSED_BWD_C = 8192
# Chunk of a row per iteration in the looped kernels. The looped backward takes half the
# forward's chunk: at 4096 (8 warps) ptxas settles on 64 registers and spills with the
# residual; 2048 over 4 warps keeps 16 values a thread, spill-free (sm_90, triton 3.6/3.8).
LOOP_BLOCK_C = 4096
LOOP_BWD_BLOCK_C = 2048
# Elements per program in the fused kernels: small rows are packed several to a program so
# that each one still moves a few KB (fewer, fatter programs; weights loaded once per tile).
FWD_TILE = 4096
BWD_TILE = 2048


# ------------------------------------------------------------------------------ forward --

@triton.jit
def _ln_fwd_fused(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x, stride_r, N, C, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A tile of BLOCK_M whole rows per program: one read of x (and r), one write of y (and s).

    With HAS_RES, s = x + r is rounded to S's dtype first and the statistics are those of
    the rounded s, exactly what normalising the stored sum would give.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < N
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # N * C may pass 2**31
    out_offs = rows64[:, None] * C + cols[None, :]

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + out_offs, s, mask=mask)
        x = s.to(tl.float32)

    # two-pass statistics on the tile in registers (no E[x^2] - E[x]^2 cancellation)
    if CENTER:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
    else:
        xc = x  # masked lanes were loaded as 0
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
        y = y * w.to(tl.float32)[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
        y = y + b.to(tl.float32)[None, :]
    tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=mask)
    if CENTER:
        tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _ln_fwd_looped(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x, stride_r, C, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One row per program for rows too long for registers, in chunks of BLOCK_C.

    Pass 1 takes each chunk's count n_k, mean m_k and M2_k = sum((x - m_k)^2) and merges
    them into the running (n, m, M2) as Chan et al.:
        d = m_k - m;  m += d * n_k / (n + n_k);  M2 += M2_k + d^2 * n * n_k / (n + n_k)
    which is as stable as the two-pass formula with a single read (without CENTER, M2 is
    just the running sum of squares and m stays 0). Pass 2 normalises (the row is then
    mostly in L2). With HAS_RES, pass 1 writes s and pass 2 reads it back.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            s = (x + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + row * C + cols, s, mask=mask)
            x = s.to(tl.float32)
        if CENTER:
            n_k = tl.minimum(C - start, BLOCK_C).to(tl.float32)
            mean_k = tl.sum(x, axis=0) / n_k
            xc = tl.where(mask, x - mean_k, 0.0)
            m2_k = tl.sum(xc * xc, axis=0)
            total = count + n_k
            delta = mean_k - mean
            mean = mean + delta * (n_k / total)
            m2 = m2 + m2_k + delta * delta * (count * n_k / total)
            count = total
        else:
            m2 = m2 + tl.sum(x * x, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    if CENTER:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    if HAS_RES:
        tl.debug_barrier()  # s written by other threads of this program in pass 1

    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        if HAS_RES:
            x = tl.load(S + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward --

@triton.jit
def _ln_bwd_fused(
    DY, X, W, Mean, Rstd, DS, DX, DX2, DW_part, DB_part,
    stride_dy, stride_x, stride_ds, N, C,
    HAS_W: tl.constexpr, HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx for tiles of BLOCK_M whole rows, and this program's fp32 partial dw, db.

    Program p takes tiles p, p + P, p + 2P, ... (P programs, a few per SM): one read of x,
    dy (and ds_out), one write of dx (and dx2, the same gradient in a second dtype). The
    partial sums stay in registers across tiles and are written once, to row p of
    DW_part / DB_part (P x C fp32), for ``_ln_param_grad_reduce`` to add up.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    n_tiles = tl.cdiv(N, BLOCK_M)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if CENTER:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        else:
            xhat = x * rstd[:, None]  # masked lanes were loaded as 0
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(xhat * g, axis=1) / C
        if CENTER:
            c2 = tl.sum(g, axis=1) / C
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        else:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out_offs = rows64[:, None] * C + cols[None, :]
        tl.store(DX + out_offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + out_offs, dx.to(DX2.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(DW_part + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_part + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _ln_bwd_chunk(X, DY, W, row64, stride_x, stride_dy, cols, mask, mean, rstd,
                  HAS_W: tl.constexpr, CENTER: tl.constexpr):
    """xhat, dy and g = dy * w (fp32) for one chunk of a row; both passes of the looped
    backward recompute them rather than keep a row that does not fit in registers."""
    x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    else:
        xhat = x * rstd  # masked lanes were loaded as 0
    g = dy
    if HAS_W:
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return xhat, dy, g


@triton.jit
def _ln_bwd_looped(
    DY, X, W, Mean, Rstd, DS, DX, DX2, DW_part, DB_part,
    stride_dy, stride_x, stride_ds, N, C,
    HAS_W: tl.constexpr, HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The same as ``_ln_bwd_fused`` for rows too long for registers, one row at a time.

    Pass 1 over the row's chunks gives mean(g * xhat) (and mean(g) with CENTER); pass 2 writes dx and
    adds dy * xhat, dy into this program's own row of DW_part / DB_part (read-modify-write
    by the program that owns it: still no atomics, still a fixed order).
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_C)
    part = pid.to(tl.int64) * C
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if COMPUTE_DW:
            tl.store(DW_part + part + cols, zero, mask=cols < C)
        if COMPUTE_DB:
            tl.store(DB_part + part + cols, zero, mask=cols < C)
    tl.debug_barrier()

    for row in range(pid, N, n_programs):
        row64 = tl.cast(row, tl.int64)
        mean = 0.0
        if CENTER:
            mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        c1_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        c2_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            mask = cols < C
            xhat, dy, g = _ln_bwd_chunk(X, DY, W, row64, stride_x, stride_dy, cols, mask,
                                        mean, rstd, HAS_W, CENTER)
            c1_acc += xhat * g
            if CENTER:
                c2_acc += g
        c1 = tl.sum(c1_acc, axis=0) / C
        c2 = 0.0
        if CENTER:
            c2 = tl.sum(c2_acc, axis=0) / C
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            mask = cols < C
            xhat, dy, g = _ln_bwd_chunk(X, DY, W, row64, stride_x, stride_dy, cols, mask,
                                        mean, rstd, HAS_W, CENTER)
            dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DS:
                dx += tl.load(DS + row64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row64 * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DX2:
                tl.store(DX2 + row64 * C + cols, dx.to(DX2.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                acc = tl.load(DW_part + part + cols, mask=mask, other=0.0)
                tl.store(DW_part + part + cols, acc + dy * xhat, mask=mask)
            if COMPUTE_DB:
                acc = tl.load(DB_part + part + cols, mask=mask, other=0.0)
                tl.store(DB_part + part + cols, acc + dy, mask=mask)


@triton.jit
def _ln_param_grad_reduce(
    DW_part, DB_part, DW, DB, P, C,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dw[c] = sum_p DW_part[p, c] (and db), in fp32 and a fixed order, cast at the end.

    Each program owns BLOCK_N columns and walks the P partial rows BLOCK_P at a time.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C
    dw_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_mask[None, :]
        offs = parts.to(tl.int64)[:, None] * C + cols[None, :]
        if COMPUTE_DW:
            dw_acc += tl.load(DW_part + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db_acc += tl.load(DB_part + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, tl.sum(dw_acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, tl.sum(db_acc, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------- launch wrappers --

def _num_warps(elements: int, most: int = 16) -> int:
    # about 16 values a thread: four 16-byte fp32 vectors, enough loads in flight per warp
    return max(4, min(most, triton.next_power_of_2(elements) // 512))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(device: torch.device, n_work: int, num_warps: int) -> int:
    """Programs of the backward: a full wave of ~512 threads an SM (<= 128 registers each).

    On the CPU interpreter three programs are enough to exercise the partial sums.
    """
    if device.type != "cuda":
        return max(1, min(n_work, 3))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(n_work, _sm_count(index) * max(1, 16 // num_warps)))


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """(N, C) view of t with unit stride along C (copies only when it must)."""
    t2 = t.reshape(-1, C)
    if t2.shape[0] > 0 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(x, residual, weight, bias, eps, center=True):
    """Launch the forward; returns (y, s or None, mean, rstd), y and s shaped like x.

    ``center=False`` is RMSNorm (``bias`` must be None): no mean, which comes back as None.
    """
    C = x.shape[-1]
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    x2 = _rows(x, C)
    N = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device) if center else None
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, s, mean, rstd
    r2 = None if residual is None else _rows(residual, C)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    common = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                  CENTER=center)
    block_c = triton.next_power_of_2(C)
    with _device_guard(x):
        if block_c <= MAX_FUSED_C:
            block_m = max(1, min(16, FWD_TILE // block_c, triton.next_power_of_2(N)))
            _ln_fwd_fused[(triton.cdiv(N, block_m),)](
                x2, r2, s, y, weight, bias, mean, rstd,
                x2.stride(0), 0 if r2 is None else r2.stride(0), N, C, eps,
                BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_num_warps(block_m * block_c),
                **common,
            )
        else:
            block = min(LOOP_BLOCK_C, block_c)
            _ln_fwd_looped[(N,)](
                x2, r2, s, y, weight, bias, mean, rstd,
                x2.stride(0), 0 if r2 is None else r2.stride(0), C, eps,
                BLOCK_C=block, num_warps=_num_warps(block), **common,
            )
    return y, s, mean, rstd


def _backward(dy, x, weight, bias, mean, rstd, ds, dx_dtype, dx2_dtype, need_dw, need_db):
    """Launch the backward; returns (dx, dx2 or None, dw or None, db or None).

    ``x`` is what was normalised (s for add_layer_norm); ``mean`` None means RMSNorm (the
    rows were not centred); ``ds`` the gradient that reached s
    directly (or None); dx is written in ``dx_dtype`` and, when ``dx2_dtype`` is given,
    the same gradient also in that dtype.
    """
    C = x.shape[-1]
    x2 = _rows(x, C)
    N = x2.shape[0]
    dy2 = _rows(dy, C)
    ds2 = None if ds is None else _rows(ds, C)
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device)
    dx2 = None if dx2_dtype is None else torch.empty(x.shape, dtype=dx2_dtype, device=x.device)
    weight = None if weight is None else weight.contiguous()
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    dw = torch.empty(C, dtype=weight.dtype, device=x.device) if need_dw else None
    db = torch.empty(C, dtype=bias.dtype, device=x.device) if need_db else None
    if N == 0:
        return dx, dx2, None if dw is None else dw.zero_(), None if db is None else db.zero_()

    block_c = triton.next_power_of_2(C)
    fused = block_c <= MAX_FUSED_BWD_C
    if fused:
        block_m = max(1, min(16, BWD_TILE // block_c, triton.next_power_of_2(N)))
        num_warps = _num_warps(block_m * block_c)
        programs = _bwd_programs(x.device, triton.cdiv(N, block_m), num_warps)
    else:
        block = min(LOOP_BWD_BLOCK_C, block_c)
        num_warps = _num_warps(block)
        programs = _bwd_programs(x.device, N, num_warps)
    dw_part = torch.empty((programs, C), dtype=torch.float32, device=x.device) if need_dw else None
    db_part = torch.empty((programs, C), dtype=torch.float32, device=x.device) if need_db else None
    args = (
        dy2, x2, weight, mean, rstd, ds2, dx, dx2, dw_part, db_part,
        dy2.stride(0), x2.stride(0), 0 if ds2 is None else ds2.stride(0), N, C,
    )
    flags = dict(HAS_W=weight is not None, HAS_DS=ds is not None, HAS_DX2=dx2 is not None,
                 COMPUTE_DW=need_dw, COMPUTE_DB=need_db, CENTER=mean is not None)
    with _device_guard(x):
        if fused:
            _ln_bwd_fused[(programs,)](*args, BLOCK_M=block_m, BLOCK_C=block_c,
                                       num_warps=num_warps, **flags)
        else:
            _ln_bwd_looped[(programs,)](*args, BLOCK_C=block, num_warps=num_warps, **flags)
        if need_dw or need_db:
            # narrow column blocks: the partials are small and L2-resident, what matters is
            # enough programs (C / 32) reading them in parallel
            block_n = 32
            _ln_param_grad_reduce[(triton.cdiv(C, block_n),)](
                dw_part, db_part, dw, db, programs, C,
                COMPUTE_DW=need_dw, COMPUTE_DB=need_db, BLOCK_P=64, BLOCK_N=block_n, num_warps=4,
            )
    return dx, dx2, dw, db


# --------------------------------------------- custom ops: what torch.compile traces --

def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


@torch.library.custom_op("gptfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), _stats_like(x), _stats_like(x)


@torch.library.custom_op("gptfast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, residual, weight, bias, eps)


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return (torch.empty_like(x, dtype=dtype), torch.empty_like(x, dtype=dtype),
            _stats_like(x), _stats_like(x))


@torch.library.custom_op("gptfast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    y, _, _, rstd = _forward(x, None, weight, None, eps, center=False)
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), _stats_like(x)


@torch.library.custom_op("gptfast::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, _, rstd = _forward(x, residual, weight, None, eps, center=False)
    return y, s, rstd


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return torch.empty_like(x, dtype=dtype), torch.empty_like(x, dtype=dtype), _stats_like(x)


@torch.library.custom_op("gptfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: Optional[torch.Tensor], rstd: torch.Tensor,
    ds: Optional[torch.Tensor], dx_dtype: torch.dtype, dx2_dtype: Optional[torch.dtype],
    need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx2, dw, db); outputs not asked for come back as empty tensors (schema has no
    optional returns). ``bias`` is passed only for its dtype; ``mean`` None: RMSNorm."""
    dx, dx2, dw, db = _backward(dy, x, weight, bias, mean, rstd, ds, dx_dtype, dx2_dtype,
                                need_dw, need_db)
    def empty():  # a fresh one each time: custom op outputs may not alias each other
        return x.new_empty((0,))

    return (dx, empty() if dx2 is None else dx2, empty() if dw is None else dw,
            empty() if db is None else db)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, ds, dx_dtype, dx2_dtype, need_dw, need_db):
    def empty():
        return x.new_empty((0,))

    return (
        torch.empty_like(x, dtype=dx_dtype),
        empty() if dx2_dtype is None else torch.empty_like(x, dtype=dx2_dtype),
        torch.empty_like(weight) if weight is not None and need_dw else empty(),
        torch.empty_like(bias) if bias is not None and need_db else empty(),
    )


def _grads(ctx, dy, ds, param_index, through_op):
    """(dx, dr, dw, db) from what forward saved: (input, weight, bias, mean, rstd), where
    RMSNorm saved no bias and no mean.

    ``ctx.dtypes`` is (x dtype, residual dtype or None). d(x + r)/dx = d(x + r)/dr = 1, so
    x and r get one gradient, written once per distinct dtype. ``through_op`` calls the
    backward custom op (what torch.compile traces) instead of the launcher directly.
    """
    if creating_graph():
        return _differentiable_grads(ctx, dy, ds, param_index)
    x, weight, bias, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    need_dw = weight is not None and ctx.needs_input_grad[param_index]
    need_db = bias is not None and ctx.needs_input_grad[param_index + 1]
    if dy is None:  # only s was used downstream
        dy = torch.zeros_like(x)
    dx2_dtype = None if r_dtype is None or r_dtype == x_dtype else r_dtype
    args = (dy, x, weight, bias, mean, rstd, ds, x_dtype, dx2_dtype, need_dw, need_db)
    bwd = torch.ops.gptfast.layer_norm_bwd if through_op else _backward
    dx, dr, dw, db = bwd(*args)
    if r_dtype == x_dtype:
        dr = dx
    return dx, dr, dw if need_dw else None, db if need_db else None


def _differentiable_grads(ctx, dy, ds, param_index):
    """(dx, dr, dw, db) as :func:`_grads`, but as torch ops with a graph (double backward).

    The module docstring's backward formulas, written with differentiable torch ops on what
    forward saved. Not autograd.grad of the reference op: for add_layer_norm the saved input
    is the output s, whose graph runs back through this very node (which also has edges to
    the weight), so differentiating with respect to the weight would re-enter this backward.
    For add_layer_norm dx = dr = ds + d/ds. RMSNorm (no saved mean) skips the centring and
    its mean(g) term.
    """
    s, weight, bias, mean, _ = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    need_dw = weight is not None and ctx.needs_input_grad[param_index]
    need_db = bias is not None and ctx.needs_input_grad[param_index + 1]
    acc = reference.compute_dtype(s.dtype)
    C = s.shape[-1]
    s32 = s.to(acc)
    centred = s32 if mean is None else s32 - s32.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + ctx.eps)
    xhat = centred * rstd
    if dy is None:  # only s was used downstream
        d_input, dw, db = torch.zeros_like(s32), None, None
    else:
        dy32 = dy.to(acc)
        g = dy32 if weight is None else dy32 * weight.to(acc)
        d_input = g - xhat * (g * xhat).mean(-1, keepdim=True)
        if mean is not None:
            d_input = d_input - g.mean(-1, keepdim=True)
        d_input = rstd * d_input
        dw = (dy32 * xhat).reshape(-1, C).sum(0).to(weight.dtype) if need_dw else None
        db = dy32.reshape(-1, C).sum(0).to(bias.dtype) if need_db else None
    if ds is not None:
        d_input = d_input + ds.to(acc)
    dr = None if r_dtype is None else d_input.to(r_dtype)
    return d_input.to(x_dtype), dr, dw, db


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.dtypes = (x.dtype, None)
    ctx.eps = eps


def _ln_backward(ctx, dy, _dmean, _drstd):
    dx, _, dw, db = _grads(ctx, dy, None, 1, through_op=True)
    return dx, dw, db, None


_layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, weight, bias, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.eps = eps


def _add_ln_backward(ctx, dy, ds, _dmean, _drstd):
    return (*_grads(ctx, dy, ds, 2, through_op=True), None)


_add_layer_norm_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, None, None, rstd)
    ctx.dtypes = (x.dtype, None)
    ctx.eps = eps


def _rms_backward(ctx, dy, _drstd):
    dx, _, dw, _ = _grads(ctx, dy, None, 1, through_op=True)
    return dx, dw, None


_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s, weight, None, None, rstd)
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.eps = eps


def _add_rms_backward(ctx, dy, ds, _drstd):
    dx, dr, dw, _ = _grads(ctx, dy, ds, 2, through_op=True)
    return dx, dr, dw, None


_add_rms_norm_fwd.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)


# ------------------------------------------------- eager path: plain autograd.Functions --
# A custom op with autograd costs ~30 us of Python per call, comparable to the kernel
# itself at 16384 x 768, so eager calls skip it; torch.compile traces the custom ops.

class _LayerNorm(torch.autograd.Function):
    """LayerNorm, or RMSNorm with ``center=False`` (and bias None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, center):
        y, _, mean, rstd = _forward(x, None, weight, bias, eps, center)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.dtypes = (x.dtype, None)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, _, dw, db = _grads(ctx, dy, None, 1, through_op=False)
        return dx, dw, db, None, None


class _AddLayerNorm(torch.autograd.Function):
    """add_layer_norm, or add_rms_norm with ``center=False`` (and bias None)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, center):
        y, s, mean, rstd = _forward(x, residual, weight, bias, eps, center)
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.dtypes = (x.dtype, residual.dtype)
        ctx.eps = eps
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        return (*_grads(ctx, dy, ds, 2, through_op=False), None, None)


# ---------------------------------------------------------------------- public entries --

def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x, in x.dtype (see the module docstring)."""
    if torch.compiler.is_compiling():
        return torch.ops.gptfast.layer_norm_fwd(x, weight, bias, float(eps))[0]
    return _LayerNorm.apply(x, weight, bias, float(eps), True)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """(layer_norm(x + residual), x + residual), both in the promoted dtype, in one pass."""
    if torch.compiler.is_compiling():
        y, s, _, _ = torch.ops.gptfast.add_layer_norm_fwd(x, residual, weight, bias, float(eps))
        return y, s
    return _AddLayerNorm.apply(x, residual, weight, bias, float(eps), True)


def _rms_eps(dtype, eps) -> float:
    """torch's default for F.rms_norm: the epsilon of the dtype it computes in (fp32 for half)."""
    return float(reference.default_rms_eps(dtype) if eps is None else eps)


def rms_norm(x, weight=None, eps=None):
    """RMSNorm over the last dim of x, in x.dtype (see the module docstring)."""
    eps = _rms_eps(x.dtype, eps)
    if torch.compiler.is_compiling():
        return torch.ops.gptfast.rms_norm_fwd(x, weight, eps)[0]
    return _LayerNorm.apply(x, weight, None, eps, False)


def add_rms_norm(x, residual, weight=None, eps=None):
    """(rms_norm(x + residual), x + residual), both in the promoted dtype, in one pass."""
    eps = _rms_eps(torch.promote_types(x.dtype, residual.dtype), eps)
    if torch.compiler.is_compiling():
        y, s, _ = torch.ops.gptfast.add_rms_norm_fwd(x, residual, weight, eps)
        return y, s
    return _AddLayerNorm.apply(x, residual, weight, None, eps, False)


def _dtype_reason(**tensors) -> Optional[str]:
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} (the kernel takes float32, float16, bfloat16)"
    return None


def layer_norm_unsupported(x, weight=None, bias=None, eps=1e-5) -> Optional[str]:
    """None when the Triton kernel handles this call, else why not."""
    return _dtype_reason(x=x, weight=weight, bias=bias)


def add_layer_norm_unsupported(x, residual, weight=None, bias=None, eps=1e-5) -> Optional[str]:
    """None when the Triton kernel handles this call, else why not."""
    return _dtype_reason(x=x, residual=residual, weight=weight, bias=bias)


def rms_norm_unsupported(x, weight=None, eps=None) -> Optional[str]:
    """None when the Triton kernel handles this call, else why not."""
    return _dtype_reason(x=x, weight=weight)


def add_rms_norm_unsupported(x, residual, weight=None, eps=None) -> Optional[str]:
    """None when the Triton kernel handles this call, else why not."""
    return _dtype_reason(x=x, residual=residual, weight=weight)
