"""Helpers for testing gptfast on CPU.

``enable_interpreter_bf16()`` makes Triton's CPU interpreter (``TRITON_INTERPRET=1``) compute
bfloat16 by value. The interpreter keeps a bf16 tensor as its raw uint16 bit patterns in numpy
and applies numpy ops to those integers, so ``tl.dot`` multiplies bit patterns (errors ~1e10),
``a + b`` adds them, ``x.to(tl.bfloat16)`` truncates instead of rounding, and ``tl.sum`` /
``tl.max`` reduce integers. Upstream Triton does not support bf16 in the interpreter.

With the shim, the interpreter does what the GPU does: bf16 operands of ``tl.dot``, of
elementwise arithmetic, comparisons and math functions (exp, exp2, log, sqrt, ...), of
reductions and scans (sum, max, min, cumsum) and of ``tl.atomic_add`` are widened to fp32
exactly; the op runs in fp32; a result whose dtype is bf16 is rounded back to bf16 (round to
nearest even, overflow to inf, NaN kept NaN). Casts follow the GPU too: fp32 -> bf16 rounds to
nearest even (or toward zero with ``fp_downcast_rounding="rtz"``), bf16 -> fp32 is exact.
Loads, stores, ``tl.where``, reshapes and the like only move bits and are left alone.

It patches a few methods of ``triton.runtime.interpreter`` (the builder's shared binary,
ternary and unary op helpers, fma, erf, rsqrt, dot, casts, atomic add, and the reduction and
scan fast paths), keeping the originals, then checks on a few probe values that the patched
interpreter really computes bf16 by value. If this Triton's interpreter lacks what the shim
relies on, or a probe fails, it raises RuntimeError naming the Triton version, never silently
does nothing.

``bf16_tolerance(fp16_tolerance)`` is the rule the kernel tests use to test bf16 wherever they
test fp16: bf16 keeps 8 significant bits against fp16's 11, so its unit roundoff is 2^-8 against
2^-11 and every rounding a kernel does (inputs of a ``tl.dot`` cast to the input dtype, results
stored in it) errs 2^3 = 8 times more; a tolerance chosen for fp16 is scaled by 8. (bf16's range
is fp32's, so no fp16 overflow margin is lost.)

This module imports neither triton nor numpy until ``enable_interpreter_bf16()`` runs.
"""

from __future__ import annotations

__all__ = ["enable_interpreter_bf16", "interpreter_bf16_enabled", "bf16_tolerance",
           "BF16_ROUNDOFF_OVER_FP16", "max_error", "assert_within_reference_error"]

# unit roundoff of bf16 (2^-8) over that of fp16 (2^-11)
BF16_ROUNDOFF_OVER_FP16 = 8

_STATE = {"enabled": False}
# (owner class, attribute name) -> the interpreter's own attribute, before the shim
_ORIGINALS: dict = {}


def interpreter_bf16_enabled() -> bool:
    """True once ``enable_interpreter_bf16()`` has patched the interpreter in this process."""
    return _STATE["enabled"]


def enable_interpreter_bf16() -> bool:
    """Make Triton's CPU interpreter compute bfloat16 by value, as the GPU does.

    Returns True when the interpreter is patched (now or by an earlier call: calling again
    does nothing more), False when Triton's interpreter is not on (``TRITON_INTERPRET`` unset
    or 0), in which case nothing is imported or changed. Raises RuntimeError, naming the
    Triton version, when this Triton's interpreter does not have the internals the shim
    patches or the patched interpreter fails its probes.
    """
    from .backend import interpreter_enabled

    if not interpreter_enabled():
        return False
    if _STATE["enabled"]:
        return True
    import triton

    from . import _interpreter_bf16

    _interpreter_bf16.install(_ORIGINALS, triton.__version__)
    _STATE["enabled"] = True
    return True


def bf16_tolerance(fp16_tolerance):
    """A tolerance chosen for float16 results, scaled for bfloat16 (times 8, see the module doc).

    Takes a number, a tuple/list of numbers (e.g. ``(atol, rtol)``) or a dict of them (e.g.
    ``dict(atol=..., rtol=...)``) and returns the same shape.
    """
    if isinstance(fp16_tolerance, dict):
        return {key: bf16_tolerance(value) for key, value in fp16_tolerance.items()}
    if isinstance(fp16_tolerance, (tuple, list)):
        return type(fp16_tolerance)(bf16_tolerance(value) for value in fp16_tolerance)
    if isinstance(fp16_tolerance, bool) or not isinstance(fp16_tolerance, (int, float)):
        raise TypeError(f"fp16_tolerance must be a number, a tuple/list or a dict of numbers, "
                        f"got {type(fp16_tolerance).__name__}")
    return fp16_tolerance * BF16_ROUNDOFF_OVER_FP16


def max_error(got, want) -> float:
    """max |got - want|, computed in fp64."""
    return (got.double() - want.double()).abs().max().item()


def assert_within_reference_error(name, got, ref, exact, slack, factor=4.0):
    """Assert that ``got`` (a kernel's answer) is as accurate as ``ref`` (the reference
    backend's answer in the same dtype), both against ``exact`` (fp64 on the same inputs):

        max|got - exact| <= factor * max|ref - exact| + slack * max|exact|

    The reference's own error grows with how ill-conditioned the inputs are, so the bound
    follows the magnitude of each case without a hand-tuned number; ``slack`` (a few roundings
    of the output dtype, relative to the largest value) covers the cases the reference
    happens to get exactly.
    """
    scale = exact.double().abs().max().item()
    ref_error = max_error(ref, exact)
    bound = factor * ref_error + slack * scale
    error = max_error(got, exact)
    assert error <= bound, (f"{name}: kernel error {error:.3g} > bound {bound:.3g} (reference "
                            f"error {ref_error:.3g}, max |value| {scale:.3g})")
