"""Cross-entropy on logits, and fused linear + cross-entropy, in Triton.

For one row x of V logits with target t, lse = logsumexp(x), label smoothing s and z-loss z:

    loss    = lse - (1 - s) * x[t] - s * mean(x) + z * lse^2
    dloss/dx_j = softmax(x)_j * (1 + 2 z lse) - (1 - s) * [j == t] - s / V

Rows whose target is ``ignore_index`` have loss 0 and gradient 0; "mean" divides by the
number of the other rows (0 when there are none).

Options (see ``gptfast.reference.cross_entropy`` for the definitions): ``softcap`` c replaces x
by c * tanh(x / c) as each block is loaded, and multiplies the gradient by 1 - tanh^2;
class weights w give torch's weighted loss, whose "mean" divides by sum(w[t]) while the
z-loss term still divides by the count, so the kernel then writes the two parts' losses
separately (``SPLIT_Z``, also for ``return_z_loss``) and scales their gradients apart.

cross_entropy: one program a row reads the row once for the online max / sum of exp (fp32)
and, when autograd will want the gradient, reads it again (mostly from L2) to write the
gradient **into the logits buffer** (bf16/fp32: already divided by the count for "mean"):
the extra memory is O(N), the traffic one read and one write of the logits. Backward
multiplies that buffer by the upstream gradient in place, and skips rows whose factor is
exactly 1, so ``loss.backward()`` on a bf16 mean or sum costs one tiny launch.

When the logits are overwritten. Only the caller knows whether anything reads the logits
after the loss (a second loss, ``logits ** 2`` computed afterwards, logits returned to a
caller); no check at forward time can see a later read. So the default keeps them: the
forward computes only the loss and backward writes the gradient into a new N x V tensor.
The O(N) path is explicit: ``keep_logits=False`` is the caller's promise that the loss is
the logits' last reader. Even then (``LOGITS_POLICY`` "auto", the default) the kernel writes
into them only when it cannot change any answer that the kernel itself can see:
- the logits are a non-leaf made by an op (``lm_head(h)``), and so is their base; a leaf
  (a parameter, a tensor made with ``requires_grad=True``) and its views are never written;
- their rows do not overlap in memory (``expand``ed or ``as_strided`` logits get a separate
  gradient buffer; writing into shared rows would corrupt the very rows still being read);
- they were not overwritten already: a second gptfast cross_entropy on the same logits (and
  same version) raises RuntimeError instead of reading gradients as logits;
- an autograd node that saved them before the loss (``logits ** 2`` computed first) raises
  in backward ("modified by an inplace operation"): the write bumps their version counter.
Backward then scales that buffer in place, so a second backward through the same graph
(``retain_graph=True``) raises RuntimeError; with the default every backward works.
:func:`logits_policy` overrides the rule: ``"keep"`` never writes, ``"overwrite"`` writes
whenever autograd needs the gradient and the rows do not overlap, leaves included, with no
other check (Liger's behaviour; for benchmarks).
A row whose target is out of range and not ``ignore_index`` raises ValueError after the
kernel has run: the logits may already hold gradients then.

Kept logits are saved for backward, which recomputes the softmax from them, so editing them
in place between forward and backward raises there (version counter); torch's own
cross_entropy saves its log-softmax instead and would not notice.

Double backward (``create_graph=True``): with kept logits backward recomputes the loss with
``gptfast.reference`` and differentiates it with a graph; with overwritten logits the
gradient is returned wired to an error (see ``gptfast.double_backward``).

linear_cross_entropy: logits = x @ W.T (+ b) in chunks of rows, never N x V at once. For each
chunk: torch matmul (tensor cores) into one reused chunk buffer, the cross-entropy kernel in
place on it, then grad_x[chunk] = dlogits @ W and grad_W += dlogits.T @ x[chunk],
grad_b += sum(dlogits) into fp32 accumulators, cast to the parameter dtype at the end. For
"mean"/"sum" this happens in the forward (3 GEMMs in all) and backward only scales the
gradients by the scalar upstream gradient. For "none" the upstream gradient differs per row,
and grad_W sums rows, so it cannot be rescaled afterwards: the forward computes only the
losses and backward recomputes the logits with each row's upstream gradient folded into
dlogits (4 GEMMs); fp16 does the same (see ``_folds_mean``). Chunk size: :func:`chunk_rows`.
Like ``F.linear`` it saves x, W and b for backward (references, not copies), so an in-place
edit of any of them between forward and backward raises there, as on the reference backend.
The first backward scales the gradients made in the forward in place; a second backward
through the same graph (``retain_graph=True``) recomputes them (4 GEMMs), and a
``create_graph=True`` backward recomputes the loss with ``gptfast.reference`` (N x V logits).

Every kernel call goes through a ``torch.library.custom_op`` ("gptfast::...") with a fake
implementation, called from a ``torch.autograd.Function`` that dynamo traces, so
``torch.compile(fullgraph=True)`` has no graph break. The op that writes the gradient into
the logits declares the mutation (``mutates_args``): functionalization turns it into
``auto_functionalized``, which inductor re-inplaces when the logits are an intermediate of the
graph. A mutating op cannot carry its own autograd formula, hence the autograd.Function.
Under compile the range check of the targets happens inside the op (the kernel flags bad
rows in a one-element buffer, the op raises after it), so no data-dependent Python branch
breaks the graph.
"""

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from gptfast import reference
from gptfast.backend import interpreter_enabled
from gptfast.double_backward import creating_graph, raise_if_differentiated, reference_grads

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POLICIES = ("auto", "keep", "overwrite")

# When the logits may be overwritten by their gradient; see the module docstring.
LOGITS_POLICY = "auto"
# Rows of x per chunk in linear_cross_entropy; None picks them with chunk_rows(). The
# environment variable GPTFAST_CE_CHUNK_ROWS overrides both (tests use small chunks).
CHUNK_ROWS: Optional[int] = None

LOG2E = tl.constexpr(1.4426950408889634)


@contextlib.contextmanager
def logits_policy(policy: str):
    """``with logits_policy("keep"):`` ... sets :data:`LOGITS_POLICY` for the block.

    Use it around calls to a compiled function, not inside one: dynamo reads the policy
    while tracing and guards on it (a change recompiles).
    """
    global LOGITS_POLICY
    if policy not in POLICIES:
        raise ValueError(f"logits policy must be one of {POLICIES}, got {policy!r}")
    previous, LOGITS_POLICY = LOGITS_POLICY, policy
    try:
        yield
    finally:
        LOGITS_POLICY = previous


# ------------------------------------------------------------------------------ kernels --

@triton.jit
def _tanh_and_slope(y):
    """(tanh(y), 1 - tanh(y)^2) in fp32 from one exp2 (the interpreter has no libdevice).

    With e = exp(-2|y|): tanh|y| = (1 - e) / (1 + e) and 1 - tanh^2 = 4e / (1 + e)^2, the
    latter free of cancellation for large |y|. For |y| < 1/8, 1 - e cancels, so tanh comes
    from its odd series there (the first omitted term is below 1e-12).
    """
    a = tl.abs(y)
    e = tl.exp2(a * (-2.0 * LOG2E))
    one_plus_e = 1.0 + e
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0
                                                                  + a2 * (62.0 / 2835.0)))))
    magnitude = tl.where(a < 0.125, series, (1.0 - e) / one_plus_e)
    return tl.where(y < 0.0, -magnitude, magnitude), 4.0 * e / (one_plus_e * one_plus_e)


@triton.jit
def _load_logits(row_ptr, cols, mask, softcap, HAS_SOFTCAP: tl.constexpr, eviction: tl.constexpr):
    """A block of fp32 logits, soft-capped to softcap * tanh(x / softcap) when HAS_SOFTCAP,
    -inf where ``mask`` is off; with HAS_SOFTCAP also d(capped)/dx = 1 - tanh^2 (else 1)."""
    if HAS_SOFTCAP:
        raw = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy=eviction).to(tl.float32)
        tanh, slope = _tanh_and_slope(raw / softcap)
        x = tl.where(mask, softcap * tanh, float("-inf"))
    else:
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf"),
                    eviction_policy=eviction).to(tl.float32)
        slope = 1.0
    return x, slope


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride,
    target_ptr, loss_ptr, grad_scale_ptr, bad_target_ptr,
    vocab, ignore_index, label_smoothing, z_loss,
    class_weight_ptr, z_term_ptr, z_grad_scale_ptr, softcap,
    WRITE_GRAD: tl.constexpr, PER_ROW_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr = False,
    SPLIT_Z: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
):
    """Loss of one row and, with WRITE_GRAD, grad_scale * dloss/dx, in two passes over V.

    Pass 1, online logsumexp in fp32: per block, m' = max(m, max(x)),
        sum_exp = sum_exp * 2^((m - m') log2 e) + sum(2^((x - m') log2 e)),
    so each logit costs one exp2; lse = m + log(sum_exp). lse itself is only good to the ulp of
    the logits (1e-3 at 1e4), so the loss uses lse - x_t = (m - x_t) + log(sum_exp), the
    smoothing sums are taken relative to x_t, and p_j = exp2((x_j - m) log2 e - log2(sum_exp)):
    differences that are exact near the maximum, as torch's log_softmax.
    Pass 2 writes p_j * (1 + 2 z lse) - (1 - s) [j == t] - s / V, times the row's scale, to
    grad (which may be the logits buffer itself: every block is read before it is written).
    It walks the blocks last to first, so the first blocks it re-reads are the ones pass 1
    read last, the likeliest to still be in L2.
    A target outside [0, V) that is not ignore_index sets bad_target; such rows, like
    ignored rows, get loss 0 and gradient 0.

    HAS_SOFTCAP: every x above is c * tanh(x / c) (c = softcap), and the gradient is times
    1 - tanh^2. HAS_CLASS_WEIGHT (w = class weights, W = sum_j w_j), torch's weighted loss:
        ce = (1 - s) w_t (lse - x_t) + s / V (W lse - sum_j w_j x_j),
        dce/dx_j = p_j ((1 - s) w_t + s W / V) - (1 - s) w_t [j == t] - s w_j / V,
    the ce part scaled by grad_scale and the z part (2 z lse p_j) by z_grad_scale (a weighted
    mean divides them by different totals). SPLIT_Z: loss gets ce alone and z_term z lse^2.
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    offsets = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < vocab)

    if in_range & (~ignored):
        # The target logit first: the smoothing sums are taken relative to it (c below).
        target_logit = tl.load(logits_row + target).to(tl.float32)
        if HAS_SOFTCAP:
            target_tanh, _target_slope = _tanh_and_slope(target_logit / softcap)
            target_logit = softcap * target_tanh
        c = tl.where(tl.abs(target_logit) < float("inf"), target_logit, 0.0)
        row_max = tl.full((), float("-inf"), tl.float32)
        sum_exp = tl.zeros((), tl.float32)
        row_sum = tl.zeros((), tl.float32)  # sum_j (x_j - c), or sum_j w_j (x_j - c)
        weight_sum = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            x, _ = _load_logits(logits_row, cols, mask, softcap, HAS_SOFTCAP, "evict_last")
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            # while every logit so far is -inf, shift by 0 so no exp sees (-inf) - (-inf)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            sum_exp = (sum_exp * tl.exp2((row_max - shift) * LOG2E)
                       + tl.sum(tl.exp2((x - shift) * LOG2E), axis=0))
            row_max = new_max
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    w = tl.load(class_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    row_sum += tl.sum(w * tl.where(mask, x - c, 0.0), axis=0)
                    weight_sum += tl.sum(w, axis=0)
                else:
                    row_sum += tl.sum(tl.where(mask, x - c, 0.0), axis=0)
        # lse = row_max + log_sum is rounded to the ulp of the logits (1e-3 at 1e4), so the
        # loss and the softmax use the differences (row_max - x), exact near the maximum.
        log_sum = tl.log(sum_exp)
        lse = row_max + log_sum
        excess = (row_max - target_logit) + log_sum  # lse - x_t
        smooth = (row_max - c) + log_sum  # lse - c; the smoothing part is mean_j (lse - x_j)
        z_term = z_loss * lse * lse
        target_weight_class = 1.0
        if HAS_CLASS_WEIGHT:
            target_weight_class = tl.load(class_weight_ptr + target).to(tl.float32)
            loss = (1.0 - label_smoothing) * target_weight_class * excess
            if HAS_SMOOTHING:
                loss += label_smoothing / vocab * (weight_sum * smooth - row_sum)
            if not SPLIT_Z:
                loss += z_term
        else:
            loss = (1.0 - label_smoothing) * excess
            if HAS_SMOOTHING:
                loss += label_smoothing * (smooth - row_sum / vocab)
            if not SPLIT_Z:
                loss += z_term
        tl.store(loss_ptr + row, loss)
        if SPLIT_Z:
            tl.store(z_term_ptr + row, z_term)

        if WRITE_GRAD:
            if PER_ROW_SCALE:
                scale = tl.load(grad_scale_ptr + row).to(tl.float32)
            else:
                scale = tl.load(grad_scale_ptr).to(tl.float32)
            if HAS_CLASS_WEIGHT:
                if PER_ROW_SCALE:
                    z_scale = tl.load(z_grad_scale_ptr + row).to(tl.float32)
                else:
                    z_scale = tl.load(z_grad_scale_ptr).to(tl.float32)
                target_weight = (1.0 - label_smoothing) * target_weight_class * scale
                prob_weight = target_weight + 2.0 * z_loss * lse * z_scale
                if HAS_SMOOTHING:
                    prob_weight += label_smoothing * weight_sum / vocab * scale
            else:
                prob_weight = (1.0 + 2.0 * z_loss * lse) * scale
                target_weight = (1.0 - label_smoothing) * scale
            uniform_weight = label_smoothing / vocab * scale
            log_sum_log2 = log_sum * LOG2E
            num_blocks = tl.cdiv(vocab, BLOCK_V)
            for block in range(0, num_blocks):
                cols = (num_blocks - 1 - block) * BLOCK_V + offsets
                mask = cols < vocab
                x, slope = _load_logits(logits_row, cols, mask, softcap, HAS_SOFTCAP,
                                        "evict_first")
                prob = tl.exp2((x - row_max) * LOG2E - log_sum_log2)
                if HAS_CLASS_WEIGHT and HAS_SMOOTHING:
                    w = tl.load(class_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    grad = prob * prob_weight - uniform_weight * w
                else:
                    grad = prob * prob_weight - uniform_weight
                grad -= tl.where(cols == target, target_weight, 0.0)
                if HAS_SOFTCAP:
                    grad *= slope
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        if ~ignored:
            tl.store(bad_target_ptr, 1)
        tl.store(loss_ptr + row, 0.0)
        if SPLIT_Z:
            tl.store(z_term_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(grad_row + cols, zeros, mask=cols < vocab)


@triton.jit
def _scale_rows_kernel(grad_ptr, row_stride, scale_ptr, vocab,
                       PER_ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad[row, :] *= scale (scale[row] per row), leaving rows whose scale is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW_SCALE:
        scale = tl.load(scale_ptr + row).to(tl.float32)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        grad_row = grad_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK_V)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            grad = tl.load(grad_row + cols, mask=mask).to(tl.float32)
            tl.store(grad_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------- launch wrappers --

def _launch_config(vocab: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab`` logits of ``element_size`` bytes.

    GPU: 16 KB of logits a block (8192 bf16 or 4096 fp32) over 512 or 256 threads, i.e.
    16 values a thread: one exp2 and a few FMAs each between two block reductions, few enough
    registers for several programs an SM, which is how the loads of a row stay in flight
    (a loop without tl.dot is not software-pipelined). V = 50257 takes 7 bf16 blocks; its
    rows start only 2-byte aligned, so loads are 2 bytes a thread, still 64 contiguous bytes
    a warp instruction (a padded V such as 50304 gets 16-byte vector loads).
    Interpreter: every tl op is one numpy call, so fewer, larger blocks run faster; 2048
    still gives more than one block for the test vocabularies.
    """
    if interpreter_enabled():
        return min(triton.next_power_of_2(vocab), 2048), 4
    block = min(triton.next_power_of_2(vocab), 16384 // element_size)
    return block, max(4, min(16, block // 512))


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_cross_entropy(logits, target, loss, grad, grad_scale, bad_target,
                          ignore_index, label_smoothing, z_loss, class_weight=None, softcap=0.0,
                          z_term=None, z_grad_scale=None):
    """loss[i] (and grad[i, :] when grad is not None) for every row of the (N, V) logits.

    grad may be logits itself. grad_scale: a 0-d fp32 tensor, or one fp32 value per row.
    class_weight: None or fp32 (V,); softcap: 0.0 for none; z_term: None, or a buffer for
    the rows' z-loss terms, which loss then excludes; z_grad_scale: the z part's grad_scale
    (read only with class weights; defaults to grad_scale).
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    block, num_warps = _launch_config(vocab, logits.element_size())
    write_grad = grad is not None
    per_row_scale = grad_scale is not None and grad_scale.dim() == 1
    grad_scale = grad_scale if grad_scale is not None else loss
    with _device_guard(logits):
        _cross_entropy_kernel[(rows,)](
            logits, logits.stride(0), grad if write_grad else logits,
            grad.stride(0) if write_grad else 0,
            target, loss, grad_scale, bad_target,
            vocab, ignore_index, label_smoothing, z_loss,
            class_weight if class_weight is not None else loss,
            z_term if z_term is not None else loss,
            z_grad_scale if z_grad_scale is not None else grad_scale, softcap,
            WRITE_GRAD=write_grad, PER_ROW_SCALE=per_row_scale,
            HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_V=block,
            HAS_CLASS_WEIGHT=class_weight is not None, SPLIT_Z=z_term is not None,
            HAS_SOFTCAP=softcap > 0.0, num_warps=num_warps,
        )


def _launch_scale_rows(grad, scale):
    rows, vocab = grad.shape
    if rows == 0:
        return
    block, num_warps = _launch_config(vocab, grad.element_size())
    with _device_guard(grad):
        _scale_rows_kernel[(rows,)](grad, grad.stride(0), scale, vocab,
                                    PER_ROW_SCALE=scale.dim() == 1, BLOCK_V=block,
                                    num_warps=num_warps)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, V) with unit stride along V (the kernels index rows by stride); copies only if it must."""
    return t if t.shape[0] == 0 or t.stride(1) == 1 else t.contiguous()


def _raise_if_bad_targets(bad_target, target, vocab, ignore_index):
    if bool(bad_target.item()):
        bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
        value = int(target[bad][0])
        raise ValueError(f"target holds class index {value}, outside [0, {vocab}) and not "
                         f"ignore_index={ignore_index}")


def _new_flag(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


# -------------------------------------------------------------------- custom ops: logits --

def _row_losses(logits, target, grad_out, grad_scale, z_grad_scale, class_weight, ignore_index,
                label_smoothing, z_loss, softcap, split_z, check_targets):
    """Run the CE kernel: (per-row fp32 losses, per-row z-loss terms), and grad_scale *
    dloss/dlogits into grad_out when given; raises on out-of-range targets afterwards if asked.

    With ``split_z`` the losses exclude the z-loss terms, returned beside them; otherwise the
    losses include them and the second tensor is empty.
    """
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    z_term = torch.empty(rows if split_z else 0, dtype=torch.float32, device=logits.device)
    bad_target = _new_flag(logits.device)
    _launch_cross_entropy(logits, target, loss, grad_out, grad_scale, bad_target,
                          ignore_index, label_smoothing, z_loss, class_weight, softcap,
                          z_term if split_z else None, z_grad_scale)
    if check_targets:
        _raise_if_bad_targets(bad_target, target, logits.shape[1], ignore_index)
    return loss, z_term


def _fake_row_losses(logits, split_z):
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows if split_z else 0, dtype=torch.float32))


@torch.library.custom_op("gptfast::cross_entropy_loss", mutates_args=())
def _cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor,
                        class_weight: Optional[torch.Tensor], ignore_index: int,
                        label_smoothing: float, z_loss: float, softcap: float, split_z: bool,
                        check_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses, per-row z terms or empty) (fp32) of (N, V) logits, logits untouched."""
    return _row_losses(logits, target, None, None, None, class_weight, ignore_index,
                       label_smoothing, z_loss, softcap, split_z, check_targets)


@_cross_entropy_loss.register_fake
def _(logits, target, class_weight, ignore_index, label_smoothing, z_loss, softcap, split_z,
      check_targets):
    return _fake_row_losses(logits, split_z)


@torch.library.custom_op("gptfast::cross_entropy_loss_and_grad_", mutates_args=("logits",))
def _cross_entropy_loss_and_grad_(logits: torch.Tensor, target: torch.Tensor,
                                  class_weight: Optional[torch.Tensor], grad_scale: torch.Tensor,
                                  z_grad_scale: torch.Tensor, ignore_index: int,
                                  label_smoothing: float, z_loss: float, softcap: float,
                                  split_z: bool, check_targets: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (and z terms); overwrites the (N, V) logits with the scaled dloss/dlogits."""
    return _row_losses(logits, target, logits, grad_scale, z_grad_scale, class_weight,
                       ignore_index, label_smoothing, z_loss, softcap, split_z, check_targets)


@_cross_entropy_loss_and_grad_.register_fake
def _(logits, target, class_weight, grad_scale, z_grad_scale, ignore_index, label_smoothing,
      z_loss, softcap, split_z, check_targets):
    return _fake_row_losses(logits, split_z)


@torch.library.custom_op("gptfast::cross_entropy_grad", mutates_args=())
def _cross_entropy_grad(logits: torch.Tensor, target: torch.Tensor,
                        class_weight: Optional[torch.Tensor], grad_scale: torch.Tensor,
                        z_grad_scale: torch.Tensor, ignore_index: int, label_smoothing: float,
                        z_loss: float, softcap: float) -> torch.Tensor:
    """The scaled dloss/dlogits as a new (N, V) tensor (the kept-logits backward)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _launch_cross_entropy(logits, target, loss, grad, grad_scale, _new_flag(logits.device),
                          ignore_index, label_smoothing, z_loss, class_weight, softcap,
                          None, z_grad_scale)
    return grad


@_cross_entropy_grad.register_fake
def _(logits, target, class_weight, grad_scale, z_grad_scale, ignore_index, label_smoothing,
      z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- custom ops: linear + CE --

def chunk_rows(rows: int, vocab: int, hidden: int, element_size: int,
               device: torch.device) -> int:
    """Rows of x per chunk of linear_cross_entropy.

    The chunk's logits may take as many bytes as the weight (V x C), at least 32 MiB and at
    most 256 MiB: the weight-gradient cast at the end holds the fp32 accumulator (4VC bytes)
    next to the result (2VC for bf16), so a chunk up to the weight's size does not raise the
    peak, which stays about 6VC + 2NC bytes (245 MiB for GPT-2's V=50257, C=768 at N=16384).
    Each chunk also costs a read and a write of the fp32 accumulator in the grad_W GEMM
    epilogue (8VC bytes), so chunks much smaller than this would be slower. On CUDA at most a
    quarter of the free memory. Rounded down to a multiple of 64 rows (GEMM tiles).
    ``CHUNK_ROWS`` or the GPTFAST_CE_CHUNK_ROWS environment variable overrides it.
    """
    override = os.environ.get("GPTFAST_CE_CHUNK_ROWS") or CHUNK_ROWS
    if override:
        return max(1, min(rows, int(override)))
    budget = min(max(vocab * hidden * element_size, 32 << 20), 256 << 20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(budget, free // 4)
    chunk = max(1, budget // (vocab * element_size))
    if chunk >= 64:
        chunk -= chunk % 64
    return max(1, min(rows, chunk))


_FP32_ACCUMULATING_ADDMM = True  # cleared if this torch's addmm refuses fp32 self with bf16/fp16 inputs


def _accumulate_matmul_fp32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """accumulator (fp32) += a @ b without rounding a @ b to a's dtype first."""
    global _FP32_ACCUMULATING_ADDMM
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
        return
    if not a.is_cuda:  # no mixed-dtype GEMM on CPU; CPU shapes here are test-sized
        accumulator.addmm_(a.float(), b.float())
        return
    if _FP32_ACCUMULATING_ADDMM:
        try:  # cuBLAS reads and writes the fp32 accumulator in the GEMM epilogue
            torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
            return
        except (RuntimeError, TypeError):
            _FP32_ACCUMULATING_ADDMM = False
    slab = max(1, (32 << 20) // (4 * b.shape[1]))  # fp32 partial products of at most 32 MiB
    for start in range(0, a.shape[0], slab):
        accumulator[start:start + slab] += torch.mm(a[start:start + slab], b, out_dtype=torch.float32)


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("gptfast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    class_weight: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor],
    z_grad_scale: Optional[torch.Tensor], ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float, split_z: bool, need_x_grad: bool, need_weight_grad: bool,
    need_bias_grad: bool, check_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row losses, per-row z terms, grad_x, grad_weight, grad_bias) of
    cross_entropy(x @ W.T + b).

    The gradients are those of sum_i grad_scale_i * loss_i (grad_scale 0-d or per row), each
    empty when not asked for, all of them empty when grad_scale is None. The z terms are
    empty unless ``split_z`` (then the losses exclude them, as in ``_row_losses``).
    A weight and bias in another dtype than x (fp32 with bf16/fp16 x, as autocast leaves an
    fp32 lm_head) are cast to x's dtype once for the GEMMs, as F.linear under autocast does;
    grad_weight and grad_bias accumulate in fp32 and come back in their own dtypes.
    """
    rows, hidden = x.shape
    vocab = weight.shape[0]
    device = x.device
    with_grad = grad_scale is not None
    need_x_grad, need_weight_grad, need_bias_grad = (
        with_grad and need_x_grad, with_grad and need_weight_grad,
        with_grad and need_bias_grad and bias is not None)
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    z_term = torch.empty(rows if split_z else 0, dtype=torch.float32, device=device)
    grad_x = x.new_empty(x.shape) if need_x_grad else _empty_grad(x)
    fp32 = dict(dtype=torch.float32, device=device)
    grad_weight32 = torch.zeros(vocab, hidden, **fp32) if need_weight_grad else None
    grad_bias32 = torch.zeros(vocab, **fp32) if need_bias_grad else None
    bad_target = _new_flag(device)
    matmul_weight = weight.to(x.dtype)  # no copy when the dtypes agree
    matmul_bias = None if bias is None else bias.to(x.dtype)

    step = chunk_rows(rows, vocab, hidden, x.element_size(), device)
    chunk_buffer = torch.empty(min(step, rows), vocab, dtype=x.dtype, device=device)
    weight_t = matmul_weight.t()
    per_row = with_grad and grad_scale.dim() == 1
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x_chunk = x[start:stop]
        logits = chunk_buffer[: stop - start]
        if bias is None:
            torch.mm(x_chunk, weight_t, out=logits)
        else:
            torch.addmm(matmul_bias, x_chunk, weight_t, out=logits)
        chunk_scale = grad_scale[start:stop] if per_row else grad_scale
        chunk_z_scale = (z_grad_scale[start:stop] if per_row and z_grad_scale is not None
                         else z_grad_scale)
        _launch_cross_entropy(logits, target[start:stop], loss[start:stop],
                              logits if with_grad else None, chunk_scale, bad_target,
                              ignore_index, label_smoothing, z_loss, class_weight, softcap,
                              z_term[start:stop] if split_z else None, chunk_z_scale)
        if need_x_grad:
            torch.mm(logits, matmul_weight, out=grad_x[start:stop])
        if need_weight_grad:
            _accumulate_matmul_fp32(grad_weight32, logits.t(), x_chunk)
        if need_bias_grad:
            grad_bias32 += logits.sum(dim=0, dtype=torch.float32)
    chunk_buffer = logits = matmul_weight = weight_t = None  # freed before the casts below
    if check_targets:
        _raise_if_bad_targets(bad_target, target, vocab, ignore_index)
    grad_weight = grad_weight32.to(weight.dtype) if need_weight_grad else _empty_grad(weight)
    grad_bias = grad_bias32.to(bias.dtype) if need_bias_grad else _empty_grad(x)
    return loss, z_term, grad_x, grad_weight, grad_bias


@_linear_cross_entropy.register_fake
def _(x, weight, bias, target, class_weight, grad_scale, z_grad_scale, ignore_index,
      label_smoothing, z_loss, softcap, split_z, need_x_grad, need_weight_grad, need_bias_grad,
      check_targets):
    with_grad = grad_scale is not None
    return (
        *_fake_row_losses(x, split_z),
        x.new_empty(x.shape) if with_grad and need_x_grad else _empty_grad(x),
        torch.empty_like(weight) if with_grad and need_weight_grad else _empty_grad(weight),
        torch.empty_like(bias) if with_grad and need_bias_grad and bias is not None else _empty_grad(x),
    )


# ------------------------------------------------------------------------------ autograd --

def _totals(target: torch.Tensor, class_weight: Optional[torch.Tensor], ignore_index: int):
    """(number of counted rows, the sum of their class weights or None without class weights)."""
    counted = target != ignore_index
    count = counted.sum()
    if class_weight is None:
        return count, None
    # clamped: an out-of-range target is reported after the kernel (compiled) or before (eager)
    picked = class_weight.gather(0, target.clamp(0, class_weight.shape[0] - 1).long())
    return count, torch.where(counted, picked, 0.0).sum()


def _safe_reciprocal(total: torch.Tensor) -> torch.Tensor:
    """1 / total, and 0 where total is 0 (a weighted mean over zero total weight is 0)."""
    nonzero = total != 0
    return torch.where(nonzero, 1.0 / torch.where(nonzero, total, 1.0), 0.0)


def _reduce(loss: torch.Tensor, z_term: Optional[torch.Tensor], count: torch.Tensor,
            weight_total: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """The reduced loss from per-row losses; ``z_term`` is None when they include the z terms.

    "mean": sum(loss) / count, or / weight_total with class weights (torch's weighted mean),
    plus sum(z_term) / count: the z-loss is a mean over counted rows, never class-weighted.
    """
    if reduction == "none":
        return loss if z_term is None else loss + z_term
    if reduction == "sum":
        return loss.sum() if z_term is None else loss.sum() + z_term.sum()
    if weight_total is None:
        mean = loss.sum() / count.clamp(min=1)
    else:
        mean = loss.sum() * _safe_reciprocal(weight_total)
    return mean if z_term is None else mean + z_term.sum() / count.clamp(min=1)


def _reduce_z(z_term: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """The z-loss term as ``return_z_loss`` returns it: reduced like the loss, unweighted."""
    if reduction == "none":
        return z_term
    return z_term.sum() if reduction == "sum" else z_term.sum() / count.clamp(min=1)


def _part_scales(factor: torch.Tensor, count: torch.Tensor, weight_total: Optional[torch.Tensor],
                 reduction: str) -> tuple:
    """(cross-entropy part's, z part's) gradient scale, from ``factor``, the scale of an
    unweighted loss (1/count folded into it for a "mean"). A weighted "mean" divides the
    cross-entropy part by the total weight instead of the count: factor * count / total.
    Both parts then share every factor applied later (upstream gradient, 1/count)."""
    if weight_total is None or reduction != "mean":
        return factor, factor
    return factor * (count.clamp(min=1) * _safe_reciprocal(weight_total)), factor


def _folds_mean(dtype: torch.dtype, reduction: str) -> bool:
    """Whether a gradient stored before backward may already carry the 1/count of "mean".

    bf16 and fp32 have fp32's exponent range, so scaling by 1/count now and by the upstream
    gradient later rounds the same as scaling once. fp16 does not: (p - onehot) / N for
    N = 16k rows underflows in fp16 before a GradScaler's upstream 2^16 could lift it, so
    fp16 stores the unscaled gradient and backward applies upstream / count.
    """
    return reduction == "mean" and dtype != torch.float16


def _forward_scale(kept: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """Factor of the gradient written in forward: 1/count when "mean" folds in, else 1 (0-d fp32)."""
    if _folds_mean(dtype, reduction):
        return 1.0 / kept.clamp(min=1).to(torch.float32)
    return torch.ones((), dtype=torch.float32, device=kept.device)


def _backward_scale(grad_loss: torch.Tensor, kept: torch.Tensor, reduction: str,
                    folded: bool) -> torch.Tensor:
    """Factor still to apply in backward: the upstream gradient (per row for "none"),
    divided by the count for a "mean" the forward did not fold in."""
    grad_loss = grad_loss.to(torch.float32).contiguous()
    if reduction == "mean" and not folded:
        return grad_loss / kept.clamp(min=1)
    return grad_loss


def _scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale (0-d, or one value per row of a 2-D grad), in grad's dtype.

    Eager: in place, without bumping grad's version counter (grad is a saved tensor that a
    second backward may still unpack), and rows whose scale is exactly 1 are not touched.
    Compiled: a pointwise op, because functionalization clones a saved tensor that an op
    mutates, whereas inductor writes a pointwise result into the saved (donated) buffer itself.
    """
    if torch.compiler.is_compiling():
        factor = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (grad.dim() - 1)))
        return (grad.to(torch.float32) * factor).to(grad.dtype)
    if grad.numel():
        _launch_scale_rows(grad if grad.dim() == 2 else grad.view(1, -1), scale)
    return grad


SECOND_BACKWARD_AFTER_OVERWRITE = (
    "gptfast.cross_entropy(..., keep_logits=False) keeps its gradient in the logits buffer and "
    "the first backward scaled it in place, so it cannot run backward a second time "
    "(retain_graph=True); pass keep_logits=True (the default) for that")


class _CrossEntropy(torch.autograd.Function):
    """Returns (loss, z-loss term): the second is empty unless ``split_z``; it is a value to
    log (the entry point detaches it), its gradient is part of the loss's."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, ignore_index, reduction, label_smoothing,
                z_loss, softcap, split_z, overwrite, check_targets):
        count, weight_total = _totals(target, class_weight, ignore_index)
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, overwrite)
        ctx.grad_used = False
        options = (ignore_index, label_smoothing, z_loss, softcap, split_z, check_targets)
        if overwrite:
            scales = _part_scales(_forward_scale(count, reduction, logits.dtype), count,
                                  weight_total, reduction)
            loss, z_term = torch.ops.gptfast.cross_entropy_loss_and_grad_(
                logits, target, class_weight, *scales, *options)
            ctx.save_for_backward(logits, count)  # logits now hold the gradient
        else:
            loss, z_term = torch.ops.gptfast.cross_entropy_loss(logits, target, class_weight,
                                                                *options)
            ctx.save_for_backward(logits, count, target, class_weight, weight_total)
        z_term = z_term if split_z else None
        reduced_z = _reduce_z(z_term, count, reduction) if split_z else loss.new_empty(0)
        return _reduce(loss, z_term, count, weight_total, reduction), reduced_z

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        ignore_index, reduction, label_smoothing, z_loss, softcap, overwrite = ctx.options
        if overwrite:
            if not torch.compiler.is_compiling() and ctx.grad_used:
                raise RuntimeError(SECOND_BACKWARD_AFTER_OVERWRITE)
            grad, count = ctx.saved_tensors
            grad = grad.detach()  # the buffer, without the logits' autograd history
            folded = _folds_mean(grad.dtype, reduction)
            if creating_graph():
                with torch.no_grad():
                    grad = _scaled(grad, _backward_scale(grad_loss, count, reduction, folded))
                (grad,) = raise_if_differentiated(
                    (grad,), "cross_entropy",
                    "with keep_logits=False the logits were overwritten by their gradient")
            else:
                grad = _scaled(grad, _backward_scale(grad_loss, count, reduction, folded))
            if not torch.compiler.is_compiling():
                ctx.grad_used = True
        else:
            logits, count, target, class_weight, weight_total = ctx.saved_tensors
            if creating_graph():
                (grad,) = reference_grads(
                    lambda rows: reference.cross_entropy(
                        rows, target, ignore_index, reduction, label_smoothing, z_loss,
                        class_weight, softcap or None),
                    (logits,), (True,), (grad_loss,))
            else:
                scales = _part_scales(_backward_scale(grad_loss, count, reduction, folded=False),
                                      count, weight_total, reduction)
                grad = torch.ops.gptfast.cross_entropy_grad(
                    logits, target, class_weight, *scales, ignore_index, label_smoothing,
                    z_loss, softcap)
        return grad, None, None, None, None, None, None, None, None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients in forward for "mean"/"sum" in bf16/fp32 (3 GEMMs; backward scales them).

    For "none" (a different upstream factor per row, which grad_W sums over) and for fp16
    (see _folds_mean), they cannot be rescaled after the fact, so the forward computes only
    the losses and backward recomputes the logits with the upstream factor folded into
    dlogits (4 GEMMs). x, weight and bias are saved either way: unpacking them in backward
    raises if they were edited in place since the forward (as F.linear's backward does), and
    a second backward (retain_graph=True), whose gradients the first one already scaled in
    place, recomputes from them. Returns (loss, z-loss term) as :class:`_CrossEntropy`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, split_z, check_targets):
        need_grads = tuple(ctx.needs_input_grad[:3])
        count, weight_total = _totals(target, class_weight, ignore_index)
        recompute = reduction == "none" or x.dtype == torch.float16
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, split_z,
                       need_grads, recompute)
        ctx.grads_used = False
        options = (ignore_index, label_smoothing, z_loss, softcap, split_z)
        if recompute:
            loss, z_term, *_ = torch.ops.gptfast.linear_cross_entropy(
                x, weight, bias, target, class_weight, None, None, *options, *need_grads,
                check_targets)
            grads = (None, None, None)
        else:
            scales = _part_scales(_forward_scale(count, reduction, x.dtype), count,
                                  weight_total, reduction)
            loss, z_term, *grads = torch.ops.gptfast.linear_cross_entropy(
                x, weight, bias, target, class_weight, *scales, *options, *need_grads,
                check_targets)
        ctx.save_for_backward(x, weight, bias, target, class_weight, count, weight_total, *grads)
        z_term = z_term if split_z else None
        reduced_z = _reduce_z(z_term, count, reduction) if split_z else loss.new_empty(0)
        return _reduce(loss, z_term, count, weight_total, reduction), reduced_z

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        (ignore_index, reduction, label_smoothing, z_loss, softcap, split_z, need_grads,
         recompute) = ctx.options
        x, weight, bias, target, class_weight, count, weight_total, *saved_grads = ctx.saved_tensors
        if creating_graph():
            grads = reference_grads(
                lambda x, weight, bias: reference.linear_cross_entropy(
                    x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                    class_weight, softcap or None),
                (x, weight, bias), need_grads, (grad_loss,))
        elif recompute or (not torch.compiler.is_compiling() and ctx.grads_used):
            scales = _part_scales(_backward_scale(grad_loss, count, reduction, folded=False),
                                  count, weight_total, reduction)
            _, _, *grads = torch.ops.gptfast.linear_cross_entropy(
                x, weight, bias, target, class_weight, *scales, ignore_index, label_smoothing,
                z_loss, softcap, False, *need_grads, False)
        else:
            scale = grad_loss.to(torch.float32)
            grads = [_scaled(grad, scale) for grad in saved_grads]
            if not torch.compiler.is_compiling():
                ctx.grads_used = True
        grad_x, grad_weight, grad_bias = (
            grad if needed else None for grad, needed in zip(grads, need_grads))
        return (grad_x, grad_weight, grad_bias) + (None,) * 9


# ----------------------------------------------------------------------------- entry points --

_HOLDS_GRADIENT = "_gptfast_holds_ce_gradient"  # attribute: the version at which it was written

OVERWRITTEN_LOGITS = (
    "these logits were already overwritten by their gradient by an earlier "
    "gptfast.cross_entropy(..., keep_logits=False): they no longer hold logits. Pass "
    "keep_logits=True (the default) to the earlier call to compute more than one loss from them")


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _holds_gradient(logits: torch.Tensor) -> bool:
    """Whether an earlier call wrote a gradient into these logits (same version, eager only)."""
    root = _root(logits)
    return getattr(root, _HOLDS_GRADIENT, None) == root._version


def _rows_are_disjoint(rows: torch.Tensor) -> bool:
    """No two elements of the (N, V) unit-column-stride rows share memory (stride arithmetic,
    so torch.compile can trace it): false for expand()ed or overlapping as_strided rows."""
    return rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[1]


def _may_overwrite(rows: torch.Tensor, keep_logits: bool) -> bool:
    """Whether the forward may write the gradient into ``rows`` (see the module docstring)."""
    if LOGITS_POLICY == "keep" or not _rows_are_disjoint(rows):
        return False
    if LOGITS_POLICY == "overwrite":
        return True
    return not keep_logits and not _root(rows).is_leaf


def _class_weight(weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if weight is None else weight.detach().to(torch.float32).contiguous()


def _outputs(loss, z_out, target, reduction, return_z_loss):
    if reduction == "none":
        loss = loss.reshape(target.shape)
        z_out = z_out.reshape(target.shape) if return_z_loss else z_out
    return (loss, z_out.detach()) if return_z_loss else loss


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, weight=None, softcap=None, return_z_loss=False, keep_logits=True):
    """Triton cross-entropy with the semantics of ``gptfast.reference.cross_entropy``.

    ``keep_logits=False`` lets the forward write the gradient into ``logits`` (O(N) extra
    memory instead of an N x V gradient): the caller promises that nothing reads the logits
    after this call. See the module docstring for when it then does.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and LOGITS_POLICY != "overwrite" and _holds_gradient(logits):
        raise RuntimeError(OVERWRITTEN_LOGITS)
    vocab = logits.shape[-1]
    rows = _unit_stride_rows(logits.reshape(-1, vocab))
    flat_target = reference.class_indices(target).reshape(-1).contiguous()
    check_targets = compiling  # eager callers were checked by functional
    class_weight = _class_weight(weight)
    split_z = bool(return_z_loss) or (class_weight is not None and z_loss > 0)
    options = (int(ignore_index), float(label_smoothing), float(z_loss),
                0.0 if softcap is None else float(softcap), split_z)
    if torch.is_grad_enabled() and logits.requires_grad:
        overwrite = _may_overwrite(rows, keep_logits)
        loss, z_out = _CrossEntropy.apply(rows, flat_target, class_weight, options[0], reduction,
                                          *options[1:], overwrite, check_targets)
        if overwrite and not compiling:
            root = _root(rows)
            setattr(root, _HOLDS_GRADIENT, root._version)
    else:
        count, weight_total = _totals(flat_target, class_weight, options[0])
        loss, z_term = torch.ops.gptfast.cross_entropy_loss(rows, flat_target, class_weight,
                                                            *options, check_targets)
        z_term = z_term if split_z else None
        loss = _reduce(loss, z_term, count, weight_total, reduction)
        z_out = _reduce_z(z_term, count, reduction) if return_z_loss else None
    return _outputs(loss, z_out, target, reduction, return_z_loss)


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, ce_weight=None, softcap=None,
                         return_z_loss=False):
    """Triton fused linear + cross-entropy, == ``gptfast.reference.linear_cross_entropy``."""
    rows = x.reshape(-1, x.shape[-1])
    flat_target = reference.class_indices(target).reshape(-1).contiguous()
    check_targets = torch.compiler.is_compiling()
    class_weight = _class_weight(ce_weight)
    split_z = bool(return_z_loss) or (class_weight is not None and z_loss > 0)
    options = (int(ignore_index), float(label_smoothing), float(z_loss),
               0.0 if softcap is None else float(softcap), split_z)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad:
        loss, z_out = _LinearCrossEntropy.apply(rows, weight, bias, flat_target, class_weight,
                                                options[0], reduction, *options[1:],
                                                check_targets)
    else:
        count, weight_total = _totals(flat_target, class_weight, options[0])
        per_row, z_term, *_ = torch.ops.gptfast.linear_cross_entropy(
            rows, weight, bias, flat_target, class_weight, None, None, *options,
            False, False, False, check_targets)
        z_term = z_term if split_z else None
        loss = _reduce(per_row, z_term, count, weight_total, reduction)
        z_out = _reduce_z(z_term, count, reduction) if return_z_loss else None
    return _outputs(loss, z_out, target, reduction, return_z_loss)


def _dtype_reason(**tensors) -> Optional[str]:
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
    return None


def cross_entropy_unsupported(logits, target, ignore_index=-100, reduction="mean",
                              label_smoothing=0.0, z_loss=0.0, weight=None, softcap=None,
                              return_z_loss=False) -> Optional[str]:
    return _dtype_reason(logits=logits)


def linear_cross_entropy_unsupported(x, weight, target, bias=None, ignore_index=-100,
                                     reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                     ce_weight=None, softcap=None,
                                     return_z_loss=False) -> Optional[str]:
    return _dtype_reason(x=x, weight=weight, bias=bias)
