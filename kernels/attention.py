"""Fused attention (flash-attention style), causal or bidirectional, forward and backward in Triton.

Notation, per (batch, query head): Q (T, D), K and V (T, D) of the kv head the query head
reads, ``scale`` (default 1/sqrt(D)):

    S = scale * Q K^T,   P = softmax(S + mask),   O = P V

The mask keeps key j for query i when ``i - left <= j <= i + right`` (flash-attention's
window (left, right), either side unlimited; causal: right = 0) and, with document ids,
when both lie in one document. Row i so sees one contiguous band of keys
[first_i, end_i), first_i = max(doc_start_i, i - left), end_i = min(doc_end_i, i + right + 1),
both non-decreasing in i, and always contains i. The causal kernels (below) are the
default; the ``BIDIRECTIONAL`` variants (constexpr, so the causal ones compile unchanged)
bound every loop by the band: blocks outside it are skipped, blocks inside it for every row
of the tile run unmasked, only the edge blocks are masked (:func:`_band_blocks`).

Forward: each program owns BLOCK_M query rows and streams K/V in BLOCK_N tiles with the
online softmax (running max m, running sum l, unnormalised accumulator), in fp32. Scores
are kept in base 2: with ``qk_scale = scale * log2(e)``, ``exp(S - m) = exp2(Q K^T qk_scale - m2)``,
so the scale is one multiply folded into the exp2 argument (an FMA). Key blocks entirely
above the diagonal are never visited; key blocks entirely below it run without a mask;
only the BLOCK_M-wide diagonal band is masked. The forward saves O and one fp32 number
per row, ``lse2 = log2(sum_j exp2(S_ij * log2(e)))`` (the logsumexp in base-2 units),
so backward can rebuild ``P = exp2(Q K^T qk_scale - lse2)`` without the row statistics.

Backward, with dO the gradient of O:

    delta_i = sum_d dO_id O_id                 (preprocess kernel)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
    dK = scale * dS^T Q,   dQ = scale * dS K

- dK/dV kernel: a program owns BLOCK_N keys of one kv head and loops over the query heads
  of its GQA group and, for each, over the query blocks from the diagonal down to T. It
  accumulates the whole group's dK/dV in registers and writes them once, so GQA/MQA needs
  neither repeated K/V nor a reduction buffer.
- dQ kernel: a program owns BLOCK_M query rows of one query head and loops over key blocks
  from 0 up to the diagonal.
No atomics: every output element is written by exactly one program with a fixed order of
additions, so the backward is bitwise deterministic. The price is recomputing Q K^T and
dO V^T in the dQ kernel (7 matmuls instead of 5). :func:`set_atomic_dq` switches to the
faster non-deterministic path, where the dK/dV kernel also adds its dS K contributions into
an fp32 dQ buffer with atomics and the dQ kernel is skipped (head dims up to 128; wider
heads keep the deterministic backward, see ``ATOMIC_DQ_MAX_BLOCK_D``).

Layouts: any strides. q/k/v split from a fused (B, T, 3, H, D) projection and transposed
are read in place. O, dQ, dK and dV are allocated (B, T, H, D)-major and returned as
(B, H, T, D) views, the layout SDPA's flash backend returns, so the usual
``o.transpose(1, 2).reshape(B, T, H * D)`` that follows attention is free.

Strides: each kernel takes one tuple per tensor, its four (B, H, T, D) strides
(``q_strides`` = ``q.stride()``), and indexes it where separate stride arguments were used
before. Triton specialises tuple elements as it does scalars (a stride of 1 becomes a
constant, multiples of 16 keep their divisibility hint), so the compiled kernels do not
change. The block loops take no strides: :func:`_head_rows` bundles a head's rows once
(base pointer or tensor descriptor, row stride, column stride) and :func:`_load_rows` /
:func:`_store_rows` unpack it. Left written out on purpose: the per-head base pointers and
the pointer tiles a program reads or writes once stay inline, in their old order, not in a
shared helper. ptxas allocates registers from the PTX as Triton emits it, and both an extra
inlined jit function (its debug scope adds labels) and a reordered address computation
change that PTX: a first cut with such helpers moved 7 of the 655 configs of ``python -m
gptfast.bench.sm90 --kernels attention`` by -15 to +18 registers on triton 3.8, and 17 by -2
to +15 on triton 3.6 (one to 255), without spills. As written, all 655 keep their registers,
spills, shared memory, wgmma and TMA on both.

Head dims 1..256 (BLOCK_D = next power of two >= 16, padded columns masked), any T >= 0,
fp16/bf16 (fp32 too, with tf32 dots when ``torch.backends.cuda.matmul.allow_tf32``).

Double backward (``create_graph=True``) is not implemented: the gradients come back wired
to an error, so differentiating them again raises RuntimeError instead of dropping the
second-order terms (``gptfast.double_backward``).

Under torch.compile both passes are torch custom ops (``gptfast::causal_attention_forward``
/ ``gptfast::causal_attention_backward``) with fake implementations and a registered
autograd formula, so ``torch.compile(fullgraph=True)`` keeps them as single graph nodes;
:func:`attention` (flash-attention's masks, optional lse) is ``gptfast::attention_forward``
/ ``gptfast::attention_backward``, which take the window ints as they come.
Eager calls run the same launchers under a plain autograd.Function.

In the CPU interpreter (TRITON_INTERPRET=1) the kernels run with small fixed tiles; on GPU
the tiles, warps and pipeline stages are autotuned per (head dim, T bucket, dtype, dQ path,
dot precision); ``T_BUCKET`` is a plain int argument read only by the autotune key, so every
bucket shares one compiled kernel.

Two data paths, chosen per config (``TMA``) by the autotuner's timing: pointer tiles (masked
``tl.load`` / ``tl.store``, cp.async pipelines), and on Hopper tensor descriptors built in
the kernel (``tl.make_tensor_descriptor``; the TMA unit copies the streamed Q/K/V/dO tiles
and the forward's Q and O whole, padding rows past T and columns past the head dim with
zeros). Descriptors need a contiguous head dim and 16-byte aligned bases and strides; where
an input lacks them (``TMA_OK``, part of the key) only the pointer configs run. Their
scratch memory comes from triton's allocator, set to torch's unless the caller set one.

The forward has two grids, also chosen per config (``PERSISTENT``): a program per (batch *
head, query block) tile, or (``PERSISTENT`` programs per SM) one program per SM looping
over the same tiles in the same longest-first order, with the same tile body.
"""

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from gptfast.backend import interpreter_enabled
from gptfast.kernels._autotune import spill_checked_autotune
from gptfast.double_backward import creating_graph, raise_if_differentiated
from gptfast.testing import interpreter_bf16_enabled

# triton.jit decides at definition time whether kernels run in the interpreter.
_INTERPRET = interpreter_enabled()
LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256
# The atomic dQ path keeps dK, dV (fp32, BLOCK_N x BLOCK_D each) and the dQ product live in
# one program; at BLOCK_D 256 every sm_90 config that keeps its dots on wgmma spills (the
# accumulators alone take 128 of a thread's 255 registers), so wider heads use the
# deterministic backward instead.
ATOMIC_DQ_MAX_BLOCK_D = 128
# Per-(batch, head) element offsets are int32 inside the kernels (batch/head bases are int64).
_MAX_INT32 = 2**31 - 1


# ------------------------------------------------------------------------- tile I/O --

@triton.jit
def _load_tile(ptrs, offs_t, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_T: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows >= T and padded columns >= HEAD_DIM read as 0."""
    if CHECK_T:
        mask = offs_t[:, None] < T
        if BLOCK_D != HEAD_DIM:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, tile, offs_t, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                CHECK_T: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, skipping rows >= T and padded columns."""
    if CHECK_T:
        mask = offs_t[:, None] < T
        if BLOCK_D != HEAD_DIM:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tl.store(ptrs, tile, mask=mask)
    elif BLOCK_D != HEAD_DIM:
        tl.store(ptrs, tile, mask=offs_d[None, :] < HEAD_DIM)
    else:
        tl.store(ptrs, tile)


@triton.jit
def _load_row_stat(ptrs, offs_t, T, CHECK_T: tl.constexpr):
    """Load one fp32 statistic per row (lse2 or delta); rows >= T read as 0."""
    if CHECK_T:
        stat = tl.load(ptrs, mask=offs_t < T, other=0.0)
    else:
        stat = tl.load(ptrs)
    return stat


@triton.jit
def _head_rows(head_base, strides, T, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """One head's (T, HEAD_DIM) rows, as :func:`_load_rows` and :func:`_store_rows` take them:
    (source, row stride, column stride), from the head's base pointer and ``strides``, the
    tensor's four (B, H, T, D) strides (one tuple). The source is ``head_base`` itself (the
    pointer path) or, with ``TMA``, a tensor descriptor over the rows with (ROWS, BLOCK_D)
    tiles, which the Hopper TMA unit copies to shared memory whole. The descriptor pads rows
    >= T and columns >= HEAD_DIM with zeros on load and drops them on store, as the masks do.
    The caller checks that the base and the row stride are 16-byte aligned and the rows
    contiguous (``TMA_OK``)."""
    if TMA:
        src = tl.make_tensor_descriptor(head_base, [T, HEAD_DIM], [strides[2], 1],
                                        [ROWS, BLOCK_D])
    else:
        src = head_base
    return src, strides[2], strides[3]


@triton.jit
def _load_rows(rows, start, offs_t, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_T: tl.constexpr):
    """The tile of rows [start, start + len(offs_t)) of a :func:`_head_rows`."""
    src, stride_t, stride_d = rows
    if isinstance(src, tl.tensor_descriptor):
        return src.load([start, 0])
    else:
        return _load_tile(src + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d,
                          offs_t, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)


@triton.jit
def _store_rows(rows, start, tile, offs_t, offs_d, T, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, CHECK_T: tl.constexpr):
    """Store a tile at rows [start, start + len(offs_t)) of a :func:`_head_rows`."""
    dst, stride_t, stride_d = rows
    if isinstance(dst, tl.tensor_descriptor):
        dst.store([start, 0], tile)
    else:
        _store_tile(dst + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d,
                    tile, offs_t, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)


# -------------------------------------------------------------------------- forward --

@triton.jit
def _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head, offs_m, lo, hi, T, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL_MASK: tl.constexpr, CHECK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    row_start=None, window=None,
                    DOCUMENT_MASK: tl.constexpr = False, WINDOW_MASK: tl.constexpr = False,
                    row_end=None, BAND_MASK: tl.constexpr = False):
    """Online softmax over key blocks [lo, hi) for one tile of query rows (K_head, V_head:
    :func:`_head_rows`).

    With m2 the running row max of ``S * log2(e)`` and l the running row sum:
        m2' = max(m2, rowmax(Q K^T) * qk_scale)
        P   = exp2(Q K^T * qk_scale - m2')
        l'  = l * exp2(m2 - m2') + rowsum(P)
        acc = acc * exp2(m2 - m2') + P V
    ``CAUSAL_MASK`` (diagonal band only) drops keys after the query row; ``DOCUMENT_MASK``
    keys before the row's document start ``row_start``, ``WINDOW_MASK`` keys ``window`` or
    more positions back; ``BAND_MASK`` (bidirectional) keeps keys [row_start, row_end) of
    each row. With any of them, a row may see no key of a block before its first
    visible one: its running max stays -inf (so the first key it does see sets the max,
    however far below 0 its score is), and only the exp2 arguments read it as 0, so that
    exp2(-inf - -inf) never makes a NaN: P and alpha come out 0 while the row has seen nothing.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, start_n, offs_n, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if DOCUMENT_MASK:
            qk = tl.where(offs_n[None, :] >= row_start[:, None], qk, float("-inf"))
        if WINDOW_MASK:
            qk = tl.where(offs_m[:, None] - offs_n[None, :] < window, qk, float("-inf"))
        if BAND_MASK:
            qk = tl.where((offs_n[None, :] >= row_start[:, None])
                          & (offs_n[None, :] < row_end[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_exp = m_new  # the max subtracted in the exp2 arguments: finite
        if DOCUMENT_MASK or WINDOW_MASK or BAND_MASK:
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_exp[:, None])
        alpha = tl.math.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V_head, start_n, offs_n, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)
        # P is rounded to V's dtype for the tensor-core matmul, which accumulates in fp32
        # straight into the rescaled acc.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _visible_keys(DOC_START, batch, start_m, offs_m, T, window,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOCUMENTS: tl.constexpr, SLIDING: tl.constexpr):
    """Key bounds of the query tile [start_m, start_m + BLOCK_M) under document/window masks.

    Row i sees keys [first_i, i] with first_i = max(doc_start_i, i - window + 1), which
    never decreases with i. Keys below the first row's bound are seen by no row (skipped);
    keys from the last row's bound up to start_m by every row (unmasked). Returns
    (lo, full_lo, row_start): lo and full_lo rounded out to BLOCK_N, full_lo <= start_m, and
    the per-row document starts (0 for rows >= T).
    """
    last_row = tl.minimum(start_m + BLOCK_M, T) - 1
    lo = start_m * 0
    full_lo = start_m * 0
    row_start = offs_m * 0
    if DOCUMENTS:
        starts = DOC_START + batch * T
        row_start = tl.load(starts + offs_m, mask=offs_m < T, other=0)
        lo = tl.load(starts + start_m)
        full_lo = tl.load(starts + last_row)
    if SLIDING:
        lo = tl.maximum(lo, start_m - window + 1)
        full_lo = tl.maximum(full_lo, last_row - window + 1)
    lo = tl.minimum(tl.maximum(lo, 0), start_m) // BLOCK_N * BLOCK_N
    full_lo = tl.maximum(tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, start_m), lo)
    return lo, full_lo, row_start


@triton.jit
def _band(DOC_START, DOC_END, idx, T, before, after, DOCUMENTS: tl.constexpr,
          LIMIT_BEFORE: tl.constexpr, LIMIT_AFTER: tl.constexpr):
    """(first, end) of the positions visible from position(s) ``idx`` on the other axis of a
    bidirectional mask: [max(doc_start, idx - before, 0), min(doc_end, idx + after, T)), each
    side limited only where its flag says. Both bounds never decrease with idx. Positions
    >= T (tile padding) may get an empty band."""
    first = idx * 0
    end = idx * 0 + T
    if DOCUMENTS:
        first = tl.load(DOC_START + idx, mask=idx < T, other=0)
        end = tl.load(DOC_END + idx, mask=idx < T, other=0)
    if LIMIT_BEFORE:
        first = tl.maximum(first, idx - before)
    if LIMIT_AFTER:
        end = tl.minimum(end, idx + after)
    return tl.maximum(first, 0), tl.minimum(end, T)


@triton.jit
def _band_blocks(DOC_START, DOC_END, batch, start, offs, T, before, after,
                 BLOCK: tl.constexpr, STEP: tl.constexpr, DOCUMENTS: tl.constexpr,
                 LIMIT_BEFORE: tl.constexpr, LIMIT_AFTER: tl.constexpr):
    """Where the tile [start, start + BLOCK) of one axis looks on the other, under a
    bidirectional mask (:func:`_band`), in STEP-sized blocks.

    Returns (lo, full_lo, full_hi, hi, first, end), the bounds multiples of STEP: blocks
    outside [lo, hi) are seen by no position of the tile (skipped); [full_lo, full_hi) by
    every one, all below T (unmasked); [lo, full_lo) and [full_hi, hi) are the edges,
    masked by the per-position bands [first, end).
    """
    if DOCUMENTS:
        DOC_START += batch * T
        DOC_END += batch * T
    last = tl.minimum(start + BLOCK, T) - 1
    first_start, end_start = _band(DOC_START, DOC_END, start, T, before, after,
                                   DOCUMENTS, LIMIT_BEFORE, LIMIT_AFTER)
    first_last, end_last = _band(DOC_START, DOC_END, last, T, before, after,
                                 DOCUMENTS, LIMIT_BEFORE, LIMIT_AFTER)
    first, end = _band(DOC_START, DOC_END, offs, T, before, after,
                       DOCUMENTS, LIMIT_BEFORE, LIMIT_AFTER)
    lo = first_start // STEP * STEP
    hi = tl.maximum((end_last + STEP - 1) // STEP * STEP, lo)
    full_lo = tl.minimum(tl.maximum((first_last + STEP - 1) // STEP * STEP, lo), hi)
    full_hi = tl.maximum(tl.minimum(end_start // STEP * STEP, hi), full_lo)
    return lo, full_lo, full_hi, hi, first, end


@triton.jit
def _query_tile(H, GROUP, BLOCK_M: tl.constexpr):
    """(batch * H + head, first query row, batch, head, kv head) of a program on the grid
    (B * H, cdiv(T, BLOCK_M)); query blocks are taken last-first, so the blocks that see the
    most keys start first and the tail of the grid is balanced."""
    pid_bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    batch = (pid_bh // H).to(tl.int64)
    head = pid_bh % H
    kv_head = (head // GROUP).to(tl.int64)
    return pid_bh, start_m, batch, head.to(tl.int64), kv_head


@triton.jit
def _persistent_tile(tile, BH, n_blocks, H, GROUP, BLOCK_M: tl.constexpr):
    """_query_tile's result for the tile-th program of the grid (BH, n_blocks), counted in
    launch order (the first grid dim fastest), so a persistent loop keeps the longest-first
    order."""
    pid_bh = tile % BH
    start_m = (n_blocks - 1 - tile // BH) * BLOCK_M
    batch = (pid_bh // H).to(tl.int64)
    head = pid_bh % H
    kv_head = (head // GROUP).to(tl.int64)
    return pid_bh, start_m, batch, head.to(tl.int64), kv_head


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE2, q_strides, k_strides, v_strides, o_strides,
                     H, T, GROUP, qk_scale,
                     T_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     EVEN_T: tl.constexpr, DOC_START=None, window=None,
                     DOCUMENTS: tl.constexpr = False, SLIDING: tl.constexpr = False,
                     TMA: tl.constexpr = False, TMA_OK: tl.constexpr = False,
                     BH=1, PERSISTENT: tl.constexpr = 0, DOC_END=None, window_right=None,
                     BIDIRECTIONAL: tl.constexpr = False, SLIDING_RIGHT: tl.constexpr = False):
    """O and lse2 for BLOCK_M query rows of one (batch, query head). ``q_strides`` etc.:
    each tensor's four (B, H, T, D) strides, one tuple.

    Grid (B * H, cdiv(T, BLOCK_M)). Query blocks are taken last-first: the last blocks see
    the most keys, and starting them first (across all heads) balances the tail of the grid.
    Keys [0, start_m) are all visible to every row of the tile (BLOCK_M % BLOCK_N == 0), so
    they run unmasked; keys [start_m, start_m + BLOCK_M) are the masked diagonal band.
    With ``DOCUMENTS``/``SLIDING`` the tile's keys before the diagonal begin at
    :func:`_visible_keys`' bounds: blocks before ``lo`` are skipped, [lo, full_lo) masked.
    With ``BIDIRECTIONAL`` row i sees keys [first_i, end_i) (:func:`_band`: its document,
    ``window`` - 1 keys back if ``SLIDING``, ``window_right`` ahead if ``SLIDING_RIGHT``),
    visited as :func:`_band_blocks` says: skipped, unmasked, or masked at the two edges.
    With ``PERSISTENT`` (programs per SM) the grid is min(tiles, SMs * PERSISTENT) programs,
    each looping over the tiles of that grid (``BH`` = B * H) in the same order.
    """
    if PERSISTENT:  # a grid of PERSISTENT programs per SM walks the tiles in grid order
        n_blocks = tl.cdiv(T, BLOCK_M)
        for tile in range(tl.program_id(0), BH * n_blocks, tl.num_programs(0)):
            pid_bh, start_m, batch, head, kv_head = _persistent_tile(tile, BH, n_blocks, H, GROUP,
                                                                     BLOCK_M)
            _attn_fwd_tile(pid_bh, start_m, batch, head, kv_head, Q, K, V, O, LSE2,
                           q_strides, k_strides, v_strides, o_strides, T, qk_scale,
                           HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N, EVEN_T,
                           DOC_START, window, DOCUMENTS, SLIDING, TMA, TMA_OK,
                           DOC_END, window_right, BIDIRECTIONAL, SLIDING_RIGHT)
    else:
        pid_bh, start_m, batch, head, kv_head = _query_tile(H, GROUP, BLOCK_M)
        _attn_fwd_tile(pid_bh, start_m, batch, head, kv_head, Q, K, V, O, LSE2,
                       q_strides, k_strides, v_strides, o_strides, T, qk_scale,
                       HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N, EVEN_T,
                       DOC_START, window, DOCUMENTS, SLIDING, TMA, TMA_OK,
                       DOC_END, window_right, BIDIRECTIONAL, SLIDING_RIGHT)


@triton.jit
def _attn_fwd_tile(pid_bh, start_m, batch, head, kv_head, Q, K, V, O, LSE2,
                   q_strides, k_strides, v_strides, o_strides, T, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_T: tl.constexpr,
                   DOC_START, window, DOCUMENTS: tl.constexpr, SLIDING: tl.constexpr,
                   TMA: tl.constexpr, TMA_OK: tl.constexpr, DOC_END, window_right,
                   BIDIRECTIONAL: tl.constexpr, SLIDING_RIGHT: tl.constexpr):
    """The forward's work on one query tile (see _attn_fwd_kernel)."""
    Q_head = Q + batch * q_strides[0] + head * q_strides[1]
    K_head = K + batch * k_strides[0] + kv_head * k_strides[1]
    V_head = V + batch * v_strides[0] + kv_head * v_strides[1]
    O_head = O + batch * o_strides[0] + head * o_strides[1]
    Q_head = _head_rows(Q_head, q_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, TMA and TMA_OK)
    K_head = _head_rows(K_head, k_strides, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA and TMA_OK)
    V_head = _head_rows(V_head, v_strides, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA and TMA_OK)
    O_head = _head_rows(O_head, o_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, TMA and TMA_OK)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q_head, start_m, offs_m, offs_d, T, HEAD_DIM, BLOCK_D, not EVEN_T)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BIDIRECTIONAL:
        lo, full_lo, full_hi, hi, row_first, row_end = _band_blocks(
            DOC_START, DOC_END, batch, start_m, offs_m, T, window - 1, window_right + 1,
            BLOCK_M, BLOCK_N, DOCUMENTS, SLIDING, SLIDING_RIGHT)
        # The edges, masked per row; a row's first visible key may lie in either.
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head,
                                        offs_m, lo, full_lo, T, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, False, not EVEN_T,
                                        DOT_PRECISION, row_first, row_end=row_end,
                                        BAND_MASK=True)
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head,
                                        offs_m, full_hi, hi, T, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, False, not EVEN_T,
                                        DOT_PRECISION, row_first, row_end=row_end,
                                        BAND_MASK=True)
        # Keys every row of the tile sees (all < T): no mask of any kind.
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head,
                                        offs_m, full_lo, full_hi, T, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, DOT_PRECISION)
    else:
        full_lo = 0
        row_start = offs_m
        if DOCUMENTS or SLIDING:
            lo, full_lo, row_start = _visible_keys(DOC_START, batch, start_m, offs_m, T, window,
                                                   BLOCK_M, BLOCK_N, DOCUMENTS, SLIDING)
            # Keys some rows of the tile may not see: masked.
            acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head,
                                            offs_m, lo, full_lo, T, qk_scale,
                                            HEAD_DIM, BLOCK_D, BLOCK_N, False, False,
                                            DOT_PRECISION, row_start, window, DOCUMENTS, SLIDING)
        # Below the diagonal: keys < start_m <= T, no mask of any kind.
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head,
                                        offs_m, full_lo, start_m, T, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, DOT_PRECISION)
        # The diagonal band. Every row sees at least key start_m, so m_i is finite afterwards.
        # (With document or window masks every row still sees itself, in this band.)
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, K_head, V_head,
                                        offs_m, start_m, tl.minimum(start_m + BLOCK_M, T), T,
                                        qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, not EVEN_T,
                                        DOT_PRECISION, row_start, window, DOCUMENTS, SLIDING)

    if DOCUMENTS or SLIDING or BIDIRECTIONAL:
        # padded rows >= T may see no key: l = 1 keeps their (unstored) O 0
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    lse2 = m_i + tl.math.log2(l_i)
    o = acc / l_i[:, None]
    _store_rows(O_head, start_m, o.to(O.dtype.element_ty), offs_m, offs_d, T, HEAD_DIM, BLOCK_D,
                not EVEN_T)
    lse_ptrs = LSE2 + pid_bh.to(tl.int64) * T + offs_m
    if EVEN_T:
        tl.store(lse_ptrs, lse2)
    else:
        tl.store(lse_ptrs, lse2, mask=offs_m < T)


# ------------------------------------------------------------------------- backward --

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, o_strides, do_strides, H, T,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta_i = sum_d dO_id * O_id in fp32, for BLOCK_T rows of one (batch, head).

    Grid (B * H, cdiv(T, BLOCK_T)). delta is the row term of the softmax backward,
    dS = P * (dP - delta), since sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i.
    """
    pid_bh = tl.program_id(0)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + batch * o_strides[0] + head * o_strides[1]
                   + offs_t[:, None] * o_strides[2] + offs_d[None, :] * o_strides[3],
                   offs_t, offs_d, T, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + batch * do_strides[0] + head * do_strides[1]
                    + offs_t[:, None] * do_strides[2] + offs_d[None, :] * do_strides[3],
                    offs_t, offs_d, T, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n,
                           Q_head, DO_head, LSE2_head, DELTA_head, DQ_head,
                           lo, hi, T, qk_scale, sm_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           CAUSAL_MASK: tl.constexpr, CHECK_T: tl.constexpr,
                           ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           key_end=None, window=None,
                           DOCUMENT_MASK: tl.constexpr = False, WINDOW_MASK: tl.constexpr = False,
                           key_first=None, BAND_MASK: tl.constexpr = False):
    """Add the query blocks [lo, hi) of one query head to a key block's dK/dV (Q_head,
    DO_head, DQ_head: :func:`_head_rows`, DQ_head's on the pointer path; LSE2_head,
    DELTA_head: the head's row statistics).

    Works on transposed scores so the key rows stay the M dimension of every matmul:
        P^T  = exp2(K Q^T * qk_scale - lse2)        dV += P^T dO
        dP^T = V dO^T      dS^T = P^T * (dP^T - delta)      dK += dS^T Q
    With ``ATOMIC_DQ`` it also adds scale * dS K into the fp32 dQ buffer. ``DOCUMENT_MASK``
    drops queries at or after the key's document end ``key_end``, ``WINDOW_MASK`` queries
    ``window`` or more positions after the key; ``BAND_MASK`` (bidirectional) keeps the
    queries [key_first, key_end) of each key.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_head, start_m, offs_m, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)
        lse2 = _load_row_stat(LSE2_head + offs_m, offs_m, T, CHECK_T)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        if DOCUMENT_MASK:
            p_t = tl.where(offs_m[None, :] < key_end[:, None], p_t, 0.0)
        if WINDOW_MASK:
            p_t = tl.where(offs_m[None, :] - offs_n[:, None] < window, p_t, 0.0)
        if BAND_MASK:
            p_t = tl.where((offs_m[None, :] >= key_first[:, None])
                           & (offs_m[None, :] < key_end[:, None]), p_t, 0.0)
        # Rows >= T load q = dO = lse2 = delta = 0: p is finite there and dO = delta = 0
        # make their dV, dK (and dQ) contributions exactly zero.
        do = _load_rows(DO_head, start_m, offs_m, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = _load_row_stat(DELTA_head + offs_m, offs_m, T, CHECK_T)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq_base, stride_dqt, stride_dqd = DQ_head
            # wgmma needs M >= 64: the longer of BLOCK_M and BLOCK_D is the product's M, so
            # short query steps take dQ^T = K^T dS^T and add it through transposed pointers.
            if BLOCK_M < BLOCK_D:
                dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION) * sm_scale
                dq_mask = (offs_m[None, :] < T) & (offs_d[:, None] < HEAD_DIM)
                tl.atomic_add(dq_base + offs_m[None, :] * stride_dqt + offs_d[:, None] * stride_dqd,
                              dq_t, mask=dq_mask, sem="relaxed")
            else:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * sm_scale
                dq_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                              dq, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, DQ_ACCUM,
                          q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
                          dq_strides, H, HKV, T, GROUP, qk_scale, sm_scale,
                          T_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_T: tl.constexpr,
                          DOC_END=None, window=None,
                          DOCUMENTS: tl.constexpr = False, SLIDING: tl.constexpr = False,
                          TMA: tl.constexpr = False, TMA_OK: tl.constexpr = False,
                          BHKV=1, PERSISTENT: tl.constexpr = 0, DOC_START=None, window_right=None,
                          BIDIRECTIONAL: tl.constexpr = False,
                          SLIDING_RIGHT: tl.constexpr = False):
    """dK, dV for BLOCK_N keys of one (batch, kv head), summed over its GROUP query heads.
    ``q_strides`` etc.: each tensor's four (B, H, T, D) strides, one tuple.

    Grid (B * HKV, cdiv(T, BLOCK_N)). The first key blocks are seen by the most queries,
    and they come first in launch order. Query blocks [start_n, start_n + BLOCK_N) are the
    masked diagonal band (BLOCK_N % BLOCK_M == 0); the ones after it are unmasked, with
    only a final partial block (T % BLOCK_M != 0) bounds-checked.

    With ``DOCUMENTS``/``SLIDING``, key j is seen by queries [j, last_j) with
    last_j = min(doc_end_j, j + window), which never decreases with j: queries before the
    first key's bound see every key of the block (unmasked), queries from there up to the
    last key's bound are masked (with the bounds check), and later ones are skipped.
    With ``BIDIRECTIONAL`` key j is seen by queries [max(doc_start_j, j - window_right),
    min(doc_end_j, j + window)): :func:`_band` with the two windows swapped, visited as
    :func:`_band_blocks` says.
    With ``PERSISTENT`` (programs per SM) the grid is min(tiles, SMs * PERSISTENT) programs,
    each looping over the tiles of that grid (``BHKV`` = B * HKV) in the same order.
    """
    if PERSISTENT:
        for tile in range(tl.program_id(0), BHKV * tl.cdiv(T, BLOCK_N), tl.num_programs(0)):
            pid_bh = tile % BHKV
            start_n = tile // BHKV * BLOCK_N
            batch = (pid_bh // HKV).to(tl.int64)
            kv_head = (pid_bh % HKV).to(tl.int64)
            _attn_bwd_dkdv_tile(start_n, batch, kv_head,
                                Q, K, V, DO, LSE2, DELTA, DK, DV, DQ_ACCUM,
                                q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
                                dq_strides, H, T, GROUP, qk_scale, sm_scale,
                                HEAD_DIM, BLOCK_D, ATOMIC_DQ, DOT_PRECISION, BLOCK_M, BLOCK_N,
                                EVEN_T, DOC_END, window, DOCUMENTS, SLIDING, TMA, TMA_OK,
                                DOC_START, window_right, BIDIRECTIONAL, SLIDING_RIGHT)
    else:
        pid_bh = tl.program_id(0)
        start_n = tl.program_id(1) * BLOCK_N
        batch = (pid_bh // HKV).to(tl.int64)
        kv_head = (pid_bh % HKV).to(tl.int64)
        _attn_bwd_dkdv_tile(start_n, batch, kv_head, Q, K, V, DO, LSE2, DELTA, DK, DV, DQ_ACCUM,
                            q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
                            dq_strides, H, T, GROUP, qk_scale, sm_scale,
                            HEAD_DIM, BLOCK_D, ATOMIC_DQ, DOT_PRECISION, BLOCK_M, BLOCK_N,
                            EVEN_T, DOC_END, window, DOCUMENTS, SLIDING, TMA, TMA_OK,
                            DOC_START, window_right, BIDIRECTIONAL, SLIDING_RIGHT)


@triton.jit
def _attn_bwd_dkdv_tile(start_n, batch, kv_head, Q, K, V, DO, LSE2, DELTA, DK, DV, DQ_ACCUM,
                        q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
                        dq_strides, H, T, GROUP, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_T: tl.constexpr,
                        DOC_END, window, DOCUMENTS: tl.constexpr, SLIDING: tl.constexpr,
                        TMA: tl.constexpr, TMA_OK: tl.constexpr, DOC_START, window_right,
                        BIDIRECTIONAL: tl.constexpr, SLIDING_RIGHT: tl.constexpr):
    """The dK/dV work on one key block (see _attn_bwd_dkdv_kernel)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + batch * k_strides[0] + kv_head * k_strides[1]
                   + offs_n[:, None] * k_strides[2] + offs_d[None, :] * k_strides[3],
                   offs_n, offs_d, T, HEAD_DIM, BLOCK_D, not EVEN_T)
    v = _load_tile(V + batch * v_strides[0] + kv_head * v_strides[1]
                   + offs_n[:, None] * v_strides[2] + offs_d[None, :] * v_strides[3],
                   offs_n, offs_d, T, HEAD_DIM, BLOCK_D, not EVEN_T)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if BIDIRECTIONAL:
        lo, full_lo, full_hi, hi, key_first, key_end = _band_blocks(
            DOC_START, DOC_END, batch, start_n, offs_n, T, window_right, window,
            BLOCK_N, BLOCK_M, DOCUMENTS, SLIDING_RIGHT, SLIDING)
        for group_index in range(GROUP):
            head = kv_head * GROUP + group_index
            Q_head = Q + batch * q_strides[0] + head * q_strides[1]
            DO_head = DO + batch * do_strides[0] + head * do_strides[1]
            DQ_head = DQ_ACCUM + batch * dq_strides[0] + head * dq_strides[1]
            Q_head = _head_rows(Q_head, q_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, TMA and TMA_OK)
            DO_head = _head_rows(DO_head, do_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, TMA and TMA_OK)
            DQ_head = _head_rows(DQ_head, dq_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, False)
            row_stats = (batch * H + head) * T
            # the edges, masked per key, then the queries every key of the block sees
            dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                            LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                            lo, full_lo, T, qk_scale, sm_scale,
                                            HEAD_DIM, BLOCK_D, BLOCK_M, False, not EVEN_T,
                                            ATOMIC_DQ, DOT_PRECISION, key_end,
                                            key_first=key_first, BAND_MASK=True)
            dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                            LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                            full_hi, hi, T, qk_scale, sm_scale,
                                            HEAD_DIM, BLOCK_D, BLOCK_M, False, not EVEN_T,
                                            ATOMIC_DQ, DOT_PRECISION, key_end,
                                            key_first=key_first, BAND_MASK=True)
            dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                            LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                            full_lo, full_hi, T, qk_scale, sm_scale,
                                            HEAD_DIM, BLOCK_D, BLOCK_M, False, False,
                                            ATOMIC_DQ, DOT_PRECISION)
    else:
        diagonal_end = tl.minimum(start_n + BLOCK_N, T)
        full_end = diagonal_end + (tl.maximum(T - diagonal_end, 0) // BLOCK_M) * BLOCK_M
        edge_end = T
        key_end = offs_n
        if DOCUMENTS or SLIDING:
            last_key = diagonal_end - 1
            hi = T + start_n * 0
            full_hi = T + start_n * 0
            if DOCUMENTS:
                ends = DOC_END + batch * T
                key_end = tl.load(ends + offs_n, mask=offs_n < T, other=0)
                full_hi = tl.load(ends + start_n)
                hi = tl.load(ends + last_key)
            if SLIDING:
                full_hi = tl.minimum(full_hi, start_n + window)
                hi = tl.minimum(hi, last_key + window)
            full_end = tl.minimum(full_end,
                                  tl.maximum(full_hi // BLOCK_M * BLOCK_M, diagonal_end))
            edge_end = tl.maximum((hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M, full_end)  # hi <= T
        for group_index in range(GROUP):
            head = kv_head * GROUP + group_index
            Q_head = Q + batch * q_strides[0] + head * q_strides[1]
            DO_head = DO + batch * do_strides[0] + head * do_strides[1]
            DQ_head = DQ_ACCUM + batch * dq_strides[0] + head * dq_strides[1]
            Q_head = _head_rows(Q_head, q_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, TMA and TMA_OK)
            DO_head = _head_rows(DO_head, do_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, TMA and TMA_OK)
            DQ_head = _head_rows(DQ_head, dq_strides, T, HEAD_DIM, BLOCK_M, BLOCK_D, False)
            row_stats = (batch * H + head) * T
            dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                            LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                            start_n, diagonal_end, T, qk_scale, sm_scale,
                                            HEAD_DIM, BLOCK_D, BLOCK_M, True, not EVEN_T,
                                            ATOMIC_DQ, DOT_PRECISION,
                                            key_end, window, DOCUMENTS, SLIDING)
            dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                            LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                            diagonal_end, full_end, T, qk_scale, sm_scale,
                                            HEAD_DIM, BLOCK_D, BLOCK_M, False, False,
                                            ATOMIC_DQ, DOT_PRECISION)
            if DOCUMENTS or SLIDING:
                # Queries some keys of the block may not see, and the partial last block.
                dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                                LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                                full_end, edge_end, T, qk_scale, sm_scale,
                                                HEAD_DIM, BLOCK_D, BLOCK_M, False, not EVEN_T,
                                                ATOMIC_DQ, DOT_PRECISION,
                                                key_end, window, DOCUMENTS, SLIDING)
            elif not EVEN_T:
                dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, offs_n, Q_head, DO_head,
                                                LSE2 + row_stats, DELTA + row_stats, DQ_head,
                                                full_end, T, T, qk_scale, sm_scale,
                                                HEAD_DIM, BLOCK_D, BLOCK_M, False, True,
                                                ATOMIC_DQ, DOT_PRECISION)

    _store_tile(DV + batch * dv_strides[0] + kv_head * dv_strides[1]
                + offs_n[:, None] * dv_strides[2] + offs_d[None, :] * dv_strides[3],
                dv.to(DV.dtype.element_ty), offs_n, offs_d, T, HEAD_DIM, BLOCK_D, not EVEN_T)
    _store_tile(DK + batch * dk_strides[0] + kv_head * dk_strides[1]
                + offs_n[:, None] * dk_strides[2] + offs_d[None, :] * dk_strides[3],
                (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_d, T, HEAD_DIM, BLOCK_D,
                not EVEN_T)


@triton.jit
def _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head, lo, hi, T, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL_MASK: tl.constexpr, CHECK_T: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, row_start=None, window=None,
                       DOCUMENT_MASK: tl.constexpr = False, WINDOW_MASK: tl.constexpr = False,
                       row_end=None, BAND_MASK: tl.constexpr = False):
    """Add the key blocks [lo, hi) to a query tile's dQ (unscaled):

        P = exp2(Q K^T * qk_scale - lse2),  dP = dO V^T,  dS = P * (dP - delta),  dQ += dS K
    The masks as in :func:`_fwd_key_blocks`.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, start_n, offs_n, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)
        v = _load_rows(V_head, start_n, offs_n, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_T)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if DOCUMENT_MASK:
            p = tl.where(offs_n[None, :] >= row_start[:, None], p, 0.0)
        if WINDOW_MASK:
            p = tl.where(offs_m[:, None] - offs_n[None, :] < window, p, 0.0)
        if BAND_MASK:
            p = tl.where((offs_n[None, :] >= row_start[:, None])
                         & (offs_n[None, :] < row_end[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ,
                        q_strides, k_strides, v_strides, do_strides, dq_strides,
                        H, T, GROUP, qk_scale, sm_scale,
                        T_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_T: tl.constexpr,
                        DOC_START=None, window=None,
                        DOCUMENTS: tl.constexpr = False, SLIDING: tl.constexpr = False,
                        TMA: tl.constexpr = False, TMA_OK: tl.constexpr = False,
                        DOC_END=None, window_right=None,
                        BIDIRECTIONAL: tl.constexpr = False, SLIDING_RIGHT: tl.constexpr = False):
    """dQ for BLOCK_M query rows of one (batch, query head): keys [0, start_m) unmasked,
    then the masked diagonal band (BLOCK_M % BLOCK_N == 0). Grid (B * H, cdiv(T, BLOCK_M)),
    last query blocks (the most keys) first. Document/window and bidirectional bounds as in
    the forward. ``q_strides`` etc.: each tensor's four (B, H, T, D) strides, one tuple.
    """
    pid_bh, start_m, batch, head, kv_head = _query_tile(H, GROUP, BLOCK_M)
    K_head = K + batch * k_strides[0] + kv_head * k_strides[1]
    V_head = V + batch * v_strides[0] + kv_head * v_strides[1]
    K_head = _head_rows(K_head, k_strides, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA and TMA_OK)
    V_head = _head_rows(V_head, v_strides, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA and TMA_OK)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + batch * q_strides[0] + head * q_strides[1]
                   + offs_m[:, None] * q_strides[2] + offs_d[None, :] * q_strides[3],
                   offs_m, offs_d, T, HEAD_DIM, BLOCK_D, not EVEN_T)
    do = _load_tile(DO + batch * do_strides[0] + head * do_strides[1]
                    + offs_m[:, None] * do_strides[2] + offs_d[None, :] * do_strides[3],
                    offs_m, offs_d, T, HEAD_DIM, BLOCK_D, not EVEN_T)
    row_stats = pid_bh.to(tl.int64) * T
    lse2 = _load_row_stat(LSE2 + row_stats + offs_m, offs_m, T, not EVEN_T)
    delta = _load_row_stat(DELTA + row_stats + offs_m, offs_m, T, not EVEN_T)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BIDIRECTIONAL:
        lo, full_lo, full_hi, hi, row_first, row_end = _band_blocks(
            DOC_START, DOC_END, batch, start_m, offs_m, T, window - 1, window_right + 1,
            BLOCK_M, BLOCK_N, DOCUMENTS, SLIDING, SLIDING_RIGHT)
        dq = _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head,
                                lo, full_lo, T, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_N, False, not EVEN_T, DOT_PRECISION,
                                row_first, row_end=row_end, BAND_MASK=True)
        dq = _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head,
                                full_lo, full_hi, T, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_N, False, False, DOT_PRECISION)
        dq = _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head,
                                full_hi, hi, T, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_N, False, not EVEN_T, DOT_PRECISION,
                                row_first, row_end=row_end, BAND_MASK=True)
    else:
        full_lo = 0
        row_start = offs_m
        if DOCUMENTS or SLIDING:
            lo, full_lo, row_start = _visible_keys(DOC_START, batch, start_m, offs_m, T, window,
                                                   BLOCK_M, BLOCK_N, DOCUMENTS, SLIDING)
            dq = _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head,
                                    lo, full_lo, T, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, False, False, DOT_PRECISION,
                                    row_start, window, DOCUMENTS, SLIDING)
        dq = _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head,
                                full_lo, start_m, T, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_N, False, False, DOT_PRECISION)
        dq = _bwd_dq_key_blocks(dq, q, do, lse2, delta, offs_m, K_head, V_head,
                                start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_N, True, not EVEN_T, DOT_PRECISION,
                                row_start, window, DOCUMENTS, SLIDING)
    _store_tile(DQ + batch * dq_strides[0] + head * dq_strides[1]
                + offs_m[:, None] * dq_strides[2] + offs_d[None, :] * dq_strides[3],
                (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, offs_d, T, HEAD_DIM, BLOCK_D,
                not EVEN_T)


# ------------------------------------------------------------- block sizes and tuning --

def _configs(shapes, tma=False, **persistent):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": tma, **persistent},
                          num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


# Hopper-sized tiles, checked by compiling every kept config for sm_90 at the benchmark
# shapes (``python -m gptfast.bench.sm90``, gated in CI by tests/test_sm90.py): no spills,
# within shared memory, every tl.dot a wgmma. A wgmma has M = 64 per warpgroup (4 warps).
# Forward: 128 query rows per program (one wgmma M=64 per warpgroup with 8 warps, or two
# with 4), 64/128 keys per step, 2-4 stage K/V pipelines; 64 rows with 8 warps for
# D = 256. BLOCK_M % BLOCK_N == 0.
_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2),
    (128, 128, 8, 3), (128, 128, 8, 4),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 2),
    (64, 64, 8, 2), (64, 64, 8, 3),
])
# dK/dV: 128 (or 64) keys per program keep dK and dV in fp32 registers, so 8 warps (4 warps
# spill at head dim >= 64); the query side steps in 16-64 rows so the pipelined Q/dO tiles
# fit beside K and V. BLOCK_N % BLOCK_M == 0.
_DKDV_CONFIGS = _configs([
    (32, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 4), (16, 128, 8, 3),
    (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3), (16, 64, 8, 2),
    (64, 64, 8, 2), (64, 64, 8, 3),
])
# dQ: 128 (or 64) query rows per program, 32/64 keys per step; 64 rows with 8 warps for
# D = 256. BLOCK_M % BLOCK_N == 0.
_DQ_CONFIGS = _configs([
    (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 16, 4, 2),
    (64, 64, 8, 2), (64, 32, 8, 3),
])
# TMA candidates (``TMA``: Q/K/V/O/dO tiles through tensor descriptors, see _head_rows),
# timed beside the pointer configs on the first GPU run. A few Hopper-shaped tiles per
# kernel keep the search short; each compiles for sm_90 to wgmma + TMA without spills
# wherever the pruner keeps it (TMA saves address registers, but some tiles the pointer
# path fits spill with TMA: dK/dV BLOCK_N 128 with BLOCK_M 64, or 32 on the atomic path).
_FWD_CONFIGS += _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 2)], tma=True)
_DKDV_CONFIGS += _configs([(32, 64, 8, 3), (16, 64, 8, 3), (16, 128, 8, 3)], tma=True)
_DQ_CONFIGS += _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3)], tma=True)
# Persistent forward and dK/dV candidates (``PERSISTENT``: one program per SM looping over
# the tiles, longest first), on each data path, timed beside the one-tile-per-program grids.
_FWD_CONFIGS += _configs([(128, 64, 8, 3)], PERSISTENT=1)
_FWD_CONFIGS += _configs([(128, 64, 8, 3)], tma=True, PERSISTENT=1)
_DKDV_CONFIGS += _configs([(32, 128, 8, 3)], PERSISTENT=1)
_DKDV_CONFIGS += _configs([(32, 64, 8, 3)], tma=True, PERSISTENT=1)
# Head dim 256 on triton >= 3.9 (ptxas 13.4 for sm_90): every 64-key dK/dV tile spills at the
# 255-register cap (16x64 8 warps: 28-32 B with 2-3 stages, pointer or TMA; 148-376 B with 1-2
# stages on TMA, 400-508 B with 16 warps), so these 32-key tiles are its candidates there: 163-166
# registers, no spill, but M = 32 < 64 puts the dK/dV dots on mma.sync, not wgmma. The pruner
# keeps them nowhere else.
_DKDV_NARROW_D256 = _configs([(16, 32, 8, 2), (16, 32, 8, 3)]) + _configs([(16, 32, 8, 3)], tma=True)
_DKDV_CONFIGS += _DKDV_NARROW_D256
# Interpreter: small fixed tiles (fast on CPU) that still take every code path: the
# diagonal band spans two steps, so masked and unmasked steps meet inside a band.
_INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
# The interpreter runs one data path: pointers, or tensor descriptors (tests switch it).
_INTERPRET_TMA = False
# and one forward and dK/dV grid: a program per tile (0), or that many programs per SM (tests
# switch it)
_INTERPRET_PERSISTENT = 0
# SMs a persistent grid is sized for off a GPU (interpreter, meta tensors): an H100 SXM's
_DEFAULT_SM_COUNT = 132

# Triton 3.9 assembles sm_90 with ptxas 13.4 (3.6 and 3.8: 12.9), which allocates registers
# differently: some tiles that fit before spill (see _pruner).
_TRITON_3_9 = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 9)
# H100: at most 227 KB of shared memory per block.
_SMEM_BUDGET = 227 * 1024
# fp32 accumulator and score elements a thread may hold (see _fp32_per_thread) before
# ptxas spills: measured on sm_90 (triton 3.6 and 3.8; the exceptions triton 3.9's ptxas 13.4
# adds are rules in _pruner). The forward and dQ kernels keep
# more bf16 operands and masks live beside their accumulators than dK/dV does; at head dim
# 256 dK/dV's own K and V operands (64 x 256 each) leave room for less.
_FP32_PER_THREAD = {"fwd": 128, "dq": 128, "dkdv": 192, "dkdv_d256": 136}


def _smem_estimate(kind, block_m, block_n, num_stages, block_d, itemsize, atomic_dq=False,
                   tma=False, persistent=False):
    """Shared memory (bytes) triton allocates for a config, as compiled for sm_90."""
    # the TMA pipeline's mbarriers take up to 1 KB beside the tiles (forward, dQ)
    barriers = 1024 if tma else 0
    if kind == "fwd":   # Q resident, K and V pipelined
        # a persistent TMA loop takes one more Q-sized tile (measured on sm_90; presumably
        # the O tile's TMA store, which no longer reuses Q's buffer)
        staged_o = block_m * block_d if tma and persistent else 0
        return ((block_m * block_d + num_stages * 2 * block_n * block_d + staged_o) * itemsize
                + barriers)
    if kind == "dq":  # Q and dO resident, K and V pipelined
        return (2 * block_m * block_d + num_stages * 2 * block_n * block_d) * itemsize + barriers
    # dK/dV: K and V resident, Q and dO pipelined, and the fp32 lse2/delta rows with them,
    # plus up to 1 KB of layout-conversion scratch
    tiles = 2 * block_n * block_d + num_stages * 2 * block_m * block_d
    stats = (num_stages - 1) * 2 * block_m * 4 + 1024
    if atomic_dq:  # dS^T and K staged as operands of the dQ product
        tiles += block_n * block_m + block_n * block_d
    return tiles * itemsize + stats


def _fp32_per_thread(kind, block_m, block_n, num_warps, block_d, atomic_dq=False):
    """fp32 elements of the accumulators and score tiles live in each thread's registers."""
    if kind == "fwd":  # O accumulator, S / P
        elements = block_m * block_d + block_m * block_n
    elif kind == "dq":  # dQ accumulator, S / P and dP / dS
        elements = block_m * block_d + 2 * block_m * block_n
    else:  # dK and dV accumulators, S^T / P^T and dP^T / dS^T, the atomic dQ product
        elements = 2 * block_n * block_d + 2 * block_n * block_m
        if atomic_dq:
            elements += block_m * block_d
    return elements // (32 * num_warps)


def _pruner(kind):
    """early_config_prune: keep the configs that fit this head dim and dtype on sm_90.

    Drops configs whose tiles exceed shared memory or whose fp32 accumulators exceed the
    registers (they would spill), oversized tiles for short sequences, and, on the atomic
    dQ path, configs whose dQ product would have M < 64 (mma.sync instead of wgmma), and
    the TMA configs where an input cannot be a tensor descriptor (``TMA_OK``, in the key).
    If nothing is left, the config with the smallest footprint.
    """
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d, t_bucket = args["BLOCK_D"], args["T_BUCKET"]
        atomic_dq = bool(args.get("ATOMIC_DQ", False))
        masked = any(bool(args.get(flag, False))
                     for flag in ("DOCUMENTS", "SLIDING", "BIDIRECTIONAL"))
        itemsize = args["Q"].element_size()
        tile = 64 if t_bucket <= 64 else None

        def footprint(c):
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            return (_fp32_per_thread(kind, m, n, c.num_warps, block_d, atomic_dq),
                    _smem_estimate(kind, m, n, c.num_stages, block_d, itemsize, atomic_dq,
                                   c.kwargs.get("TMA", False), c.kwargs.get("PERSISTENT", 0)))

        def fits(c):
            regs, smem = footprint(c)
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            limit = _FP32_PER_THREAD["dkdv_d256" if kind == "dkdv" and block_d >= 256 else kind]
            # The masked atomic dK/dV keeps masks and the dQ product live together: at head
            # dim >= 128 its 64-row query steps spill on sm_90 (measured, triton 3.8).
            if kind == "dkdv" and atomic_dq and masked and block_d >= 128 and m >= 64:
                return False
            # The masked forward's 128 x 128 score tile reaches 255 registers at head dim >= 128
            # (the pointer path spills 56 B on triton 3.6).
            if kind == "fwd" and masked and block_d >= 128 and n >= 128:
                return False
            # The atomic dK/dV's 128-key blocks on the TMA path sit at 255 registers at head
            # dim >= 128 (spilling 8 B with masks, triton 3.8).
            if (kind == "dkdv" and atomic_dq and c.kwargs.get("TMA", False)
                    and block_d >= 128 and n >= 128):
                return False
            # The persistent atomic dK/dV sits at 255 registers at head dim >= 128 and spills
            # (4-52 B on triton 3.6 and 3.8) with 128-key blocks, or with masks.
            if (kind == "dkdv" and atomic_dq and c.kwargs.get("PERSISTENT", 0)
                    and block_d >= 128):
                return False
            # The persistent bidirectional dK/dV with 128-key blocks at head dim >= 128 (32-row
            # query steps) spills 8 B on triton 3.6 and sits at 253 registers on 3.8.
            if (kind == "dkdv" and args.get("BIDIRECTIONAL", False) and c.kwargs.get("PERSISTENT", 0)
                    and block_d >= 128 and n >= 128):
                return False
            # dK/dV 64x128 tiles at head dim >= 128: 254-255 registers on triton 3.6 and 3.8,
            # and on 3.9 they spill (2 stages 12 B, 3 stages 32 B; 72-88 B with masks).
            if kind == "dkdv" and block_d >= 128 and m >= 64 and n >= 128:
                return False
            # Head dim 256: see _DKDV_NARROW_D256 (32-key tiles only on triton >= 3.9, only there).
            if kind == "dkdv" and (n < 64) != (block_d >= 256 and _TRITON_3_9):
                return False
            # dQ 64x64 tiles at head dim 256 spill 36 B on triton 3.9 (255 registers; 225 on
            # 3.8); the 64x32 ones stay (179-208 registers on 3.9).
            if kind == "dq" and block_d >= 256 and n >= 64:
                return False
            # The 4-warp 128x64 forward with 4 stages spills 12 B at head dim 64 on triton 3.9
            # (ragged T); its 3-stage twin does not.
            if kind == "fwd" and c.num_warps == 4 and m >= 128 and c.num_stages >= 4:
                return False
            return (smem <= _SMEM_BUDGET and regs <= limit
                    and (tile is None or max(m, n) <= tile))

        if not args.get("TMA_OK", False):
            configs = [c for c in configs if not c.kwargs.get("TMA", False)]
        kept = [c for c in configs if fits(c)]
        if atomic_dq:
            on_wgmma = [c for c in kept if max(c.kwargs["BLOCK_M"], block_d) >= 64]
            kept = on_wgmma or kept
        return kept or [min(configs, key=footprint)]
    return prune


def _even_t(args):
    return args["T"] % args["BLOCK_M"] == 0 and args["T"] % args["BLOCK_N"] == 0


# Every constexpr a caller passes selects a different compiled kernel, so each is in the
# key (with the T bucket and, added by the autotuner, the tensor dtypes): the atomic and
# deterministic backward, or fp32 ieee and tf32, never share one tuned config.
_TUNING_KEY = ("HEAD_DIM", "BLOCK_D", "T_BUCKET", "ATOMIC_DQ", "DOT_PRECISION",
               "DOCUMENTS", "SLIDING", "TMA_OK", "BIDIRECTIONAL", "SLIDING_RIGHT")


def _build(kernel, kind, configs, reset_to_zero=None):
    key = [name for name in _TUNING_KEY if name in kernel.arg_names]
    kernel = triton.heuristics({"EVEN_T": _even_t})(kernel)
    if _INTERPRET:
        return kernel
    # the pruner's register model is a prediction: every config it keeps is compiled and
    # dropped if the compiled kernel spills, before any is timed (gptfast.kernels._autotune)
    return spill_checked_autotune(configs=configs, key=key,
                                  prune_configs_by={"early_config_prune": _pruner(kind)},
                                  reset_to_zero=reset_to_zero)(kernel)


# The autotuner also keys on the dtypes of the tensor arguments.
_attn_fwd = _build(_attn_fwd_kernel, "fwd", _FWD_CONFIGS)
_attn_bwd_dkdv = _build(_attn_bwd_dkdv_kernel, "dkdv", _DKDV_CONFIGS, reset_to_zero=["DQ_ACCUM"])
_attn_bwd_dq = _build(_attn_bwd_dq_kernel, "dq", _DQ_CONFIGS)


def _blocks(kind):
    """Explicit tile sizes (and data path) in the interpreter; the autotuner picks them on GPU."""
    if not _INTERPRET:
        return {}
    block_m, block_n = _INTERPRET_BLOCKS[kind]
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "TMA": _INTERPRET_TMA}
    if kind in ("fwd", "dkdv"):
        blocks["PERSISTENT"] = _INTERPRET_PERSISTENT
    return blocks


def _sm_count(t):
    """SMs of t's GPU, for persistent grids; a fixed count elsewhere."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _DEFAULT_SM_COUNT


def _tile_grid(bh, t, block, programs_per_sm, sm_count):
    """(bh, blocks of T) programs, or with a persistent config the programs that loop over them."""
    tiles = triton.cdiv(t, block)
    if programs_per_sm:
        return (min(bh * tiles, sm_count * programs_per_sm),)
    return (bh, tiles)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _t_bucket(t):
    """Sequence-length bucket for the autotune key: powers of two from 64 to 16384."""
    return min(max(triton.next_power_of_2(t), 64), 16384)


def _dot_precision(dtype):
    if dtype == torch.float32 and not _INTERPRET and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


def _on_device(t):
    """Launch on t's GPU (triton launches on the current device), or nowhere special on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _bhtd_strides(t):
    """A (B, H, T, D) tensor's strides, the one tuple argument the kernels take per tensor."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _tma_ok(*tensors):
    """Whether every (B, H, T, D) tensor's heads can be TMA descriptors (``_head_rows``):
    contiguous head dim, and base, row stride and batch/head strides multiples of 16 bytes
    (the stride of a size-1 batch or head dim is never used; the row stride goes into the
    descriptor). Otherwise the kernels keep the pointer path."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or (t.shape[3] > 1 and t.stride(3) != 1) or t.stride(2) * size % 16:
            return False
        if any(t.shape[dim] > 1 and t.stride(dim) * size % 16 for dim in range(2)):
            return False
    return True


def _tma_scratch(size, alignment, stream):
    """Global memory for the descriptors the kernels build (128 B per descriptor and program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_allocator(tma_ok):
    """Kernels that build tensor descriptors need triton's scratch allocator: set torch's
    (on the current device and stream) unless the caller set one. It is per thread, and the
    backward may run on autograd's device thread, so every launch checks."""
    if not tma_ok or _INTERPRET:
        return
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def _empty_bthd(like, heads, dtype=None):
    """A (B, heads, T, D) tensor stored (B, T, heads, D)-major, as SDPA's flash backend returns."""
    b, _, t, d = like.shape
    return like.new_empty((b, t, heads, d), dtype=dtype or like.dtype).transpose(1, 2)


# ------------------------------------------------------------------ launch wrappers --

def document_bounds(document_ids):
    """(start, end) int32 (B, T): the first position of each position's document and one past
    its last, from non-decreasing ``document_ids`` (B, T), by binary search per row."""
    ids = document_ids.contiguous()
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    start = torch.searchsorted(ids, ids, side="left", out_int32=True)
    end = torch.searchsorted(ids, ids, side="right", out_int32=True)
    return start, end


def _mask_args(document_ids, window, bound, window_right=0):
    """Keyword arguments of a kernel launch for these masks; none for plain causal, so its
    launch (and compiled kernel) is the unmasked one. ``bound`` is ``document_bounds``' index
    a causal kernel reads; the bidirectional ones (``window_right`` != 0) read both."""
    if document_ids is None and window is None and window_right == 0:
        return {}
    args = dict(DOCUMENTS=document_ids is not None, SLIDING=window is not None,
                window=0 if window is None else int(window))
    if window_right != 0:
        args.update(BIDIRECTIONAL=True, SLIDING_RIGHT=window_right is not None,
                    window_right=0 if window_right is None else int(window_right))
        if document_ids is not None:
            args["DOC_START"], args["DOC_END"] = document_bounds(document_ids)
    elif document_ids is not None:
        args["DOC_END" if bound else "DOC_START"] = document_bounds(document_ids)[bound]
    return args


def kernel_windows(t, causal=True, window_left=-1, window_right=-1):
    """flash-attention's (left, right) windows over T queries and keys as the launchers take
    them: (window, window_right) with window = window_left + 1 (None: unlimited) and
    window_right 0 (causal), None (unlimited) or a count >= 1. Windows that reach past the
    sequence are unlimited, and a right window of 0 is the causal mask whatever ``causal``
    says, so those calls run the causal kernels."""
    window = None if window_left < 0 or window_left >= t - 1 else window_left + 1
    if causal or window_right == 0:
        return window, 0
    return window, None if window_right < 0 or window_right >= t - 1 else window_right


def attention_forward(q, k, v, scale, document_ids=None, window=None, window_right=0):
    """Run the forward kernel: returns (O, lse2) with lse2 (B, H, T) fp32 in base-2 units.

    ``document_ids`` (B, T) non-decreasing and ``window`` (int >= 1) restrict each query to
    its document and the last ``window`` positions (``gptfast.causal_attention``).
    ``window_right`` 0 is causal; None lets each query see every later key (of its
    document), an int >= 1 that many (:func:`kernel_windows`)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    o = _empty_bthd(q, h)
    lse2 = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse2
    sm_count = _sm_count(q)
    grid = lambda meta: _tile_grid(b * h, t, meta["BLOCK_M"],  # noqa: E731
                                   meta.get("PERSISTENT", 0), sm_count)
    tma_ok = _tma_ok(q, k, v, o)
    with _on_device(q):
        _tma_allocator(tma_ok)
        _attn_fwd[grid](q, k, v, o, lse2,
                        _bhtd_strides(q), _bhtd_strides(k), _bhtd_strides(v), _bhtd_strides(o),
                        h, t, h // hkv, scale * LOG2E,
                        HEAD_DIM=d, BLOCK_D=_block_d(d), T_BUCKET=_t_bucket(t),
                        DOT_PRECISION=_dot_precision(q.dtype), TMA_OK=tma_ok, BH=b * h,
                        **_blocks("fwd"),
                        **_mask_args(document_ids, window, 0, window_right))
    return o, lse2


def attention_backward(do, q, k, v, o, lse2, scale, atomic_dq=False, document_ids=None,
                       window=None, window_right=0, dlse2=None):
    """Run the backward kernels: returns (dQ, dK, dV) in the dtypes of q, k, v.

    ``dlse2`` (B, H, T), the gradient of the forward's lse2 where it was used: since
    d lse_i / d S_ij = P_ij, it adds P * dlse to dS, i.e. takes dlse (= dlse2 / ln 2) off
    each row's delta."""
    with _on_device(q):
        return _launch_backward(do, q, k, v, o, lse2, scale, atomic_dq, document_ids, window,
                                window_right, dlse2)


def _launch_backward(do, q, k, v, o, lse2, scale, atomic_dq, document_ids=None, window=None,
                     window_right=0, dlse2=None):
    b, h, t, d = q.shape
    hkv = k.shape[1]
    dq, dk, dv = _empty_bthd(q, h), _empty_bthd(k, hkv), _empty_bthd(v, hkv)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    block_d = _block_d(d)
    atomic_dq = atomic_dq and block_d <= ATOMIC_DQ_MAX_BLOCK_D
    delta = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    block_t = 16 if _INTERPRET else max(16, min(128, 8192 // block_d))
    _bwd_delta_kernel[(b * h, triton.cdiv(t, block_t))](
        o, do, delta, _bhtd_strides(o), _bhtd_strides(do), h, t,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4)
    if dlse2 is not None:
        delta.sub_(dlse2.to(torch.float32), alpha=1.0 / math.log(2.0))

    tma_ok = _tma_ok(q, k, v, do)
    _tma_allocator(tma_ok)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, T_BUCKET=_t_bucket(t),
                  DOT_PRECISION=_dot_precision(q.dtype), TMA_OK=tma_ok)
    group, qk_scale = h // hkv, scale * LOG2E
    if atomic_dq:
        dq_accum = _empty_bthd(q, h, torch.float32).zero_()
    else:
        dq_accum = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
    sm_count = _sm_count(q)
    grid = lambda meta: _tile_grid(b * hkv, t, meta["BLOCK_N"],  # noqa: E731
                                   meta.get("PERSISTENT", 0), sm_count)
    _attn_bwd_dkdv[grid](q, k, v, do, lse2, delta, dk, dv, dq_accum,
                         _bhtd_strides(q), _bhtd_strides(k), _bhtd_strides(v),
                         _bhtd_strides(do), _bhtd_strides(dk), _bhtd_strides(dv),
                         _bhtd_strides(dq_accum),
                         h, hkv, t, group, qk_scale, scale,
                         ATOMIC_DQ=atomic_dq, BHKV=b * hkv, **common, **_blocks("dkdv"),
                         **_mask_args(document_ids, window, 1, window_right))
    if atomic_dq:
        return dq_accum.to(q.dtype), dk, dv
    grid = lambda meta: (b * h, triton.cdiv(t, meta["BLOCK_M"]))  # noqa: E731
    _attn_bwd_dq[grid](q, k, v, do, lse2, delta, dq,
                       _bhtd_strides(q), _bhtd_strides(k), _bhtd_strides(v),
                       _bhtd_strides(do), _bhtd_strides(dq),
                       h, t, group, qk_scale, scale, **common, **_blocks("dq"),
                       **_mask_args(document_ids, window, 0, window_right))
    return dq, dk, dv


# ------------------------------------------------------------------------ custom ops --

_ATOMIC_DQ = False


def set_atomic_dq(enabled: bool) -> bool:
    """Use the atomic dQ backward (faster, not bitwise deterministic); returns the old value.

    Off by default. The setting in force when the forward runs decides its backward; under
    torch.compile it is read when the graph is traced, so set it before compiling. Head dims
    above 128 run the deterministic backward whatever the setting (no atomic config fits
    sm_90's registers without spilling there).
    """
    global _ATOMIC_DQ
    previous, _ATOMIC_DQ = _ATOMIC_DQ, bool(enabled)
    return previous


def atomic_dq_enabled() -> bool:
    return _ATOMIC_DQ


@torch.library.custom_op("gptfast::causal_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                document_ids: Optional[torch.Tensor] = None,
                window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, document_ids, window)


@_forward_op.register_fake
def _forward_fake(q, k, v, scale, document_ids=None, window=None):
    b, h, t, _ = q.shape
    return _empty_bthd(q, h), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("gptfast::causal_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor, lse2: torch.Tensor, scale: float, atomic_dq: bool,
                 document_ids: Optional[torch.Tensor] = None,
                 window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse2, scale, atomic_dq, document_ids, window)


@_backward_op.register_fake
def _backward_fake(do, q, k, v, o, lse2, scale, atomic_dq, document_ids=None, window=None):
    return _empty_bthd(q, q.shape[1]), _empty_bthd(k, k.shape[1]), _empty_bthd(v, v.shape[1])


def _setup_context(ctx, inputs, output):
    q, k, v, scale, *masks = inputs
    document_ids, window = masks + [None] * (2 - len(masks))
    o, lse2 = output
    ctx.save_for_backward(q, k, v, o, lse2, document_ids)
    ctx.scale, ctx.window = scale, window
    ctx.atomic_dq = _ATOMIC_DQ
    ctx.mark_non_differentiable(lse2)


def _no_double_backward(grads):
    """The gradients, wired to an error if create_graph=True asks to differentiate them."""
    if not creating_graph():
        return grads
    return raise_if_differentiated(grads, "causal_attention", "it has no second-order formula")


def _backward(ctx, do, _dlse2):
    q, k, v, o, lse2, document_ids = ctx.saved_tensors
    with torch.no_grad():
        if document_ids is None and ctx.window is None:
            dq, dk, dv = _backward_op(do, q, k, v, o, lse2, ctx.scale, ctx.atomic_dq)
        else:
            dq, dk, dv = _backward_op(do, q, k, v, o, lse2, ctx.scale, ctx.atomic_dq,
                                      document_ids, ctx.window)
    return (*_no_double_backward((dq, dk, dv)), None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# flash-attention's masks (``attention``): the windows go in as they come (ints, -1 for
# unlimited) and are turned into kernel arguments (kernel_windows) when the op runs, so
# tracing never branches on their values.
@torch.library.custom_op("gptfast::attention_forward", mutates_args=())
def _fa_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                   window_left: int, window_right: int,
                   document_ids: Optional[torch.Tensor] = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    window, right = kernel_windows(q.shape[2], causal, window_left, window_right)
    return attention_forward(q, k, v, scale, document_ids, window, right)


@_fa_forward_op.register_fake
def _fa_forward_fake(q, k, v, scale, causal, window_left, window_right, document_ids=None):
    return _forward_fake(q, k, v, scale)


@torch.library.custom_op("gptfast::attention_backward", mutates_args=())
def _fa_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    o: torch.Tensor, lse2: torch.Tensor, scale: float, atomic_dq: bool,
                    causal: bool, window_left: int, window_right: int,
                    document_ids: Optional[torch.Tensor] = None,
                    dlse2: Optional[torch.Tensor] = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window, right = kernel_windows(q.shape[2], causal, window_left, window_right)
    return attention_backward(do, q, k, v, o, lse2, scale, atomic_dq, document_ids, window, right,
                              dlse2)


@_fa_backward_op.register_fake
def _fa_backward_fake(do, q, k, v, o, lse2, scale, atomic_dq, causal, window_left, window_right,
                      document_ids=None, dlse2=None):
    return _backward_fake(do, q, k, v, o, lse2, scale, atomic_dq)


def _fa_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, window_left, window_right, *ids = inputs
    o, lse2 = output
    ctx.save_for_backward(q, k, v, o, lse2, ids[0] if ids else None)
    ctx.masks = (scale, _ATOMIC_DQ, causal, window_left, window_right)


def _fa_backward(ctx, do, dlse2):
    q, k, v, o, lse2, document_ids = ctx.saved_tensors
    with torch.no_grad():
        dq, dk, dv = _fa_backward_op(do, q, k, v, o, lse2, *ctx.masks, document_ids, dlse2)
    return (*_no_double_backward((dq, dk, dv)), None, None, None, None, None)


_fa_forward_op.register_autograd(_fa_backward, setup_context=_fa_setup_context)


# ---------------------------------------------------------------------- entry points --

class _CausalAttention(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the custom-op dispatcher,
    which costs tens of microseconds per call (as much as the kernels at short T)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, document_ids=None, window=None):
        o, lse2 = attention_forward(q, k, v, scale, document_ids, window)
        ctx.save_for_backward(q, k, v, o, lse2, document_ids)
        ctx.scale, ctx.window = scale, window
        ctx.atomic_dq = _ATOMIC_DQ
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2, document_ids = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = attention_backward(do, q, k, v, o, lse2, ctx.scale, ctx.atomic_dq,
                                            document_ids, ctx.window)
        return (*_no_double_backward((dq, dk, dv)), None, None, None)


def causal_attention(q, k, v, scale=None, document_ids=None, window=None):
    """Causal attention, == ``reference.causal_attention`` (SDPA is_causal, GQA by head groups).

    q: (B, H, T, D); k, v: (B, Hkv, T, D) with H % Hkv == 0; scale defaults to 1/sqrt(D).
    ``document_ids`` (B, T) non-decreasing and ``window`` (int >= 1, < T) add the document
    and sliding-window masks; the kernels then visit only key tiles some query of a tile may
    see. Returns (B, H, T, D) in q's dtype, stored (B, T, H, D)-major. Arguments are validated
    by ``gptfast.functional``. Under torch.compile this is the custom op; in eager mode an
    autograd.Function around the same kernels.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if window is not None and window >= q.shape[2]:  # sees every earlier key: plain causal
        window = None
    masks = () if document_ids is None and window is None else (document_ids, window)
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, scale, *masks)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _CausalAttention.apply(q, k, v, scale, *masks)
    return attention_forward(q, k, v, scale, *masks)[0]


def causal_attention_unsupported(q, k, v, scale=None, document_ids=None, window=None):
    """None when the kernels handle this call, else the reason."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the attention kernel takes float16, bfloat16 or float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not interpreter_bf16_enabled():
        return ("bfloat16 tl.dot is wrong in the Triton CPU interpreter (unless "
                "gptfast.testing.enable_interpreter_bf16() was called)")
    if q.device.type == "cuda" and _INTERPRET:
        return ("the kernels were defined for the CPU interpreter (TRITON_INTERPRET=1 when "
                "gptfast.kernels.attention was imported)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        (seq, head_dim), (stride_t, stride_d) = x.shape[2:], x.stride()[2:]
        if (seq - 1) * abs(stride_t) + (head_dim - 1) * abs(stride_d) > _MAX_INT32:
            return f"{name} spans more than 2**31 elements within one (batch, head)"
    return None


class _Attention(torch.autograd.Function):
    """The eager path of :func:`attention` (as _CausalAttention for causal_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window_left, window_right, document_ids=None):
        window, right = kernel_windows(q.shape[2], causal, window_left, window_right)
        o, lse2 = attention_forward(q, k, v, scale, document_ids, window, right)
        ctx.save_for_backward(q, k, v, o, lse2, document_ids)
        ctx.scale, ctx.windows, ctx.atomic_dq = scale, (window, right), _ATOMIC_DQ
        ctx.set_materialize_grads(False)
        return o, lse2

    @staticmethod
    def backward(ctx, do, dlse2):
        q, k, v, o, lse2, document_ids = ctx.saved_tensors
        if do is None:  # only the lse was used
            do = torch.zeros_like(o)
        with torch.no_grad():
            dq, dk, dv = attention_backward(do, q, k, v, o, lse2, ctx.scale, ctx.atomic_dq,
                                            document_ids, *ctx.windows, dlse2)
        return (*_no_double_backward((dq, dk, dv)), None, None, None, None, None)


def attention(q, k, v, scale=None, causal=True, window_left=-1, window_right=-1,
              document_ids=None, key_lengths=None, return_lse=False):
    """``gptfast.functional.attention`` on these kernels, for the cases
    :func:`attention_unsupported` accepts: Tq == Tk, causal or bidirectional, (left, right)
    windows, documents; with ``return_lse`` also the natural-log logsumexp (B, H, T) fp32
    (the forward's lse2 * ln 2), differentiable as the reference's is: its gradient joins
    the backward as a term of each row's delta (:func:`attention_backward`); an unused lse
    costs nothing in eager mode and one (B, H, T) subtraction of zeros under torch.compile
    (autograd hands the op a zero gradient).

    Under torch.compile this is the ``gptfast::attention_forward`` custom op, whose window
    ints are turned into kernel arguments only when it runs: layers with different windows
    share one graph, and a window passed in as an argument recompiles at most once (dynamo
    then makes it a symbolic int). Each (causal, documents, left limited, right limited)
    combination is its own compiled Triton kernel; the window values are runtime arguments.
    A right window of 0 (or ``causal``) runs the causal kernels.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, scale, causal, window_left, window_right, document_ids)
    if torch.compiler.is_compiling():
        o, lse2 = _fa_forward_op(*args)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse2 = _Attention.apply(*args)
    else:
        window, right = kernel_windows(q.shape[2], causal, window_left, window_right)
        o, lse2 = attention_forward(q, k, v, scale, document_ids, window, right)
    return (o, lse2 * math.log(2.0)) if return_lse else o


def attention_unsupported(q, k, v, scale=None, causal=True, window_left=-1, window_right=-1,
                          document_ids=None, key_lengths=None, return_lse=False):
    """None when the kernels handle this ``attention`` call, else the reason."""
    if q.shape[2] != k.shape[2]:
        return f"as many queries as keys (Tq={q.shape[2]}, Tk={k.shape[2]})"
    if key_lengths is not None:
        return "key_lengths (per-row key counts)"
    return causal_attention_unsupported(q, k, v, scale, document_ids)
