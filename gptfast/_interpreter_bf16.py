"""The bf16-by-value patch of Triton's CPU interpreter (see gptfast.testing).

The interpreter stores bf16 as uint16 bit patterns (``_get_np_dtype(tl.bfloat16)`` is uint16)
and every builder method that computes applies numpy to ``handle.data``. Each wrapper here
widens bf16 operands to fp32 TensorHandles, calls the interpreter's own method, and rounds a
floating result back to bf16 bits when the op's result dtype is bf16 (the dtype the original
method gives its result: lhs for binary ops, the last operand for ternary ops and fma, the
accumulator for dot). Ops that only move bits (load, store, where, splat, reshape, ...) are
not touched. Imported by gptfast.testing.enable_interpreter_bf16 only.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> the fp32 values they encode (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(values, round_toward_zero: bool = False) -> np.ndarray:
    """fp32 values -> bf16 bit patterns, round to nearest even (overflow gives inf, NaN stays NaN).

    Wider inputs are first rounded to fp32, as Triton's frontend casts fp64 -> fp32 -> bf16.
    """
    values = np.asarray(values).astype(np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    if round_toward_zero:
        rounded = bits >> 16
    else:
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def install(originals: dict, version: str) -> None:
    """Patch the interpreter in place, recording the replaced attributes in ``originals``.

    Raises RuntimeError naming the Triton ``version`` when the interpreter lacks what the
    patch relies on or the patched interpreter fails a probe (the patch is then undone).
    """
    interp = _interpreter_module(version)
    patches = _patches(interp)
    missing = [f"{owner.__name__}.{name}" for (owner, name) in patches if not hasattr(owner, name)]
    if missing:
        raise RuntimeError(
            f"gptfast.testing.enable_interpreter_bf16: triton {version}'s interpreter "
            f"(triton.runtime.interpreter) has no {', '.join(missing)}; the bf16 shim knows "
            "the interpreters of triton 3.6 to 3.9")
    for (owner, name), make in patches.items():
        originals[(owner, name)] = owner.__dict__.get(name, getattr(owner, name))
        setattr(owner, name, make(getattr(owner, name)))
    if not hasattr(interp.InterpreterBuilder, "get_bf16"):  # tl.full(..., tl.bfloat16) needs it
        originals[(interp.InterpreterBuilder, "get_bf16")] = None
        interp.InterpreterBuilder.get_bf16 = lambda self, value: interp.TensorHandle(
            fp32_to_bf16_bits(np.array([value], dtype=np.float64)), tl.bfloat16)
    try:
        _probe(interp)
    except Exception as err:
        uninstall(originals)
        raise RuntimeError(
            f"gptfast.testing.enable_interpreter_bf16: triton {version}'s interpreter still "
            f"computes bf16 wrongly after the shim ({err}); its internals changed") from err


def uninstall(originals: dict) -> None:
    """Put back what ``install`` replaced."""
    for (owner, name), original in originals.items():
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    originals.clear()


def _interpreter_module(version):
    try:
        from triton.runtime import interpreter
    except Exception as err:
        raise RuntimeError(f"gptfast.testing.enable_interpreter_bf16: triton {version} has no "
                           f"importable triton.runtime.interpreter ({err})") from err
    for name in ("TensorHandle", "InterpreterBuilder", "ReduceOps", "ScanOps", "_get_np_dtype",
                 "_interpreter", "_ir"):
        if not hasattr(interpreter, name):
            raise RuntimeError(f"gptfast.testing.enable_interpreter_bf16: triton {version}'s "
                               f"triton.runtime.interpreter has no {name}")
    storage = interpreter._get_np_dtype(tl.bfloat16)
    if storage != np.uint16:
        raise RuntimeError(f"gptfast.testing.enable_interpreter_bf16: triton {version}'s "
                           f"interpreter stores bfloat16 as {storage}, not as uint16 bit "
                           "patterns; the bf16 shim does not know this layout")
    return interpreter


def _patches(interp):
    """(owner, method name) -> function(original) -> replacement."""
    TensorHandle = interp.TensorHandle

    def is_bf16(handle):
        return isinstance(handle, TensorHandle) and handle.dtype == tl.bfloat16

    def widen(handle):
        if is_bf16(handle):
            return TensorHandle(bf16_bits_to_fp32(handle.data), tl.float32)
        return handle

    def narrow(result, result_is_bf16):
        """The original method's result, as bf16 bits when its dtype should be bf16."""
        if not result_is_bf16:
            return result
        if result.data.dtype.kind == "f":
            return TensorHandle(fp32_to_bf16_bits(result.data), tl.bfloat16)
        return TensorHandle(result.data, tl.bfloat16)  # e.g. a comparison's bool, as before

    def binary(original):
        def binary_op(self, lhs, rhs, op):
            if not (is_bf16(lhs) or is_bf16(rhs)):
                return original(self, lhs, rhs, op)
            return narrow(original(self, widen(lhs), widen(rhs), op), is_bf16(lhs))
        return binary_op

    def ternary(original):
        def ternary_op(self, lhs, rhs, other, op):
            if not (is_bf16(lhs) or is_bf16(rhs) or is_bf16(other)):
                return original(self, lhs, rhs, other, op)
            return narrow(original(self, widen(lhs), widen(rhs), widen(other), op), is_bf16(other))
        return ternary_op

    def unary(original):
        def unary_method(self, arg, *rest):
            if not is_bf16(arg):
                return original(self, arg, *rest)
            return narrow(original(self, widen(arg), *rest), True)
        return unary_method

    def fma(original):
        def create_fma(self, x, y, z):
            if not (is_bf16(x) or is_bf16(y) or is_bf16(z)):
                return original(self, x, y, z)
            return narrow(original(self, widen(x), widen(y), widen(z)), is_bf16(z))
        return create_fma

    def dot(original):
        def create_dot(self, a, b, d, *rest, **kwargs):
            if not (is_bf16(a) or is_bf16(b) or is_bf16(d)):
                return original(self, a, b, d, *rest, **kwargs)
            return narrow(original(self, widen(a), widen(b), widen(d), *rest, **kwargs), is_bf16(d))
        return create_dot

    def cast(original):
        def cast_impl(self, src, dst_type):
            to_bf16 = dst_type.scalar == tl.bfloat16
            if is_bf16(src) and to_bf16:
                return TensorHandle(src.data.copy(), tl.bfloat16)
            if to_bf16:
                return TensorHandle(fp32_to_bf16_bits(src.data), tl.bfloat16)
            return original(self, widen(src), dst_type)
        return cast_impl

    numpy_floats = {tl.float16: np.float16, tl.float32: np.float32, tl.float64: np.float64}

    def fp_to_fp(original):
        """Custom-rounding casts, fp8 casts, and (triton >= 3.9) fp16 <-> bf16."""
        def create_fp_to_fp(self, src, dst_type, rounding_mode):
            to_bf16 = dst_type.scalar == tl.bfloat16
            if not (is_bf16(src) or to_bf16):
                return original(self, src, dst_type, rounding_mode)
            if is_bf16(src):
                src = widen(src)
                if not to_bf16:
                    if dst_type.scalar in numpy_floats:  # numpy rounds to nearest even
                        return TensorHandle(src.data.astype(numpy_floats[dst_type.scalar]),
                                            dst_type.scalar)
                    return original(self, src, dst_type, rounding_mode)  # fp32 -> fp8
            elif src.dtype in numpy_floats:
                src = TensorHandle(src.data.astype(np.float32), tl.float32)
            else:  # fp8 -> fp32 is exact
                src = original(self, src, tl.float32, rounding_mode)
            toward_zero = "RTZ" in str(rounding_mode).upper()
            return TensorHandle(fp32_to_bf16_bits(src.data, toward_zero), tl.bfloat16)
        return create_fp_to_fp

    def atomic_rmw(original):
        fadd = interp._ir.ATOMIC_OP.FADD

        def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
            if not is_bf16(val):
                return original(self, rmwOp, ptr, val, mask, sem, scope)
            if rmwOp != fadd:
                raise NotImplementedError(
                    f"gptfast.testing.enable_interpreter_bf16: bf16 atomic {rmwOp} in the "
                    "interpreter (only atomic_add is emulated)")
            # The interpreter runs one program at a time: a plain read-modify-write is atomic.
            # (Through the interpreter's C++ load/store: the builder's load/store signatures
            # change between triton versions.)
            zeros = np.zeros(ptr.data.shape, dtype=np.uint16)
            old = interp._interpreter.load(ptr.data, mask.data, zeros, np.dtype(np.uint16))
            new = fp32_to_bf16_bits(bf16_bits_to_fp32(old) + bf16_bits_to_fp32(val.data))
            interp._interpreter.store(ptr.data, np.broadcast_to(new, ptr.data.shape), mask.data)
            return TensorHandle(old, tl.bfloat16)
        return create_atomic_rmw

    def reduction(original):
        """ReduceOps.sum/min_max and ScanOps.cumsum/cumprod take a tl.tensor."""
        def wrapper(self, input, *rest, **kwargs):
            if input.dtype != tl.bfloat16:
                return original(self, input, *rest, **kwargs)
            as_fp32 = tl.core.tensor(widen(input.handle), _retyped(input.type, tl.float32))
            result = original(self, as_fp32, *rest, **kwargs)
            if isinstance(result, (list, tuple)):
                return type(result)(_narrow_tensor(r) for r in result)
            return _narrow_tensor(result)
        return wrapper

    def _retyped(ty, dtype):
        return tl.block_type(dtype, list(ty.shape)) if ty.is_block() else dtype

    def _narrow_tensor(t):
        if not isinstance(t, tl.core.tensor) or t.dtype != tl.float32:
            return t  # the index half of argmax/argmin
        handle = TensorHandle(fp32_to_bf16_bits(t.handle.data), tl.bfloat16)
        return tl.core.tensor(handle, _retyped(t.type, tl.bfloat16))

    builder, reduce_ops, scan_ops = interp.InterpreterBuilder, interp.ReduceOps, interp.ScanOps
    return {
        (builder, "binary_op"): binary,
        (builder, "ternary_op"): ternary,
        (builder, "unary_op"): unary,
        (builder, "create_erf"): unary,
        (builder, "create_rsqrt"): unary,
        (builder, "create_fma"): fma,
        (builder, "create_dot"): dot,
        (builder, "cast_impl"): cast,
        (builder, "create_fp_to_fp"): fp_to_fp,
        (builder, "create_atomic_rmw"): atomic_rmw,
        (reduce_ops, "sum"): reduction,
        (reduce_ops, "min_max"): reduction,
        (scan_ops, "cumsum"): reduction,
        (scan_ops, "cumprod"): reduction,
    }


def _probe(interp):
    """Raise AssertionError unless the patched builder computes bf16 by value."""
    TensorHandle = interp.TensorHandle
    b = interp.InterpreterBuilder()

    def bf16(*values):
        return TensorHandle(fp32_to_bf16_bits(np.array(values, dtype=np.float32)), tl.bfloat16)

    def value(handle):
        assert handle.dtype == tl.bfloat16, f"result dtype {handle.dtype}, expected bf16"
        return bf16_bits_to_fp32(handle.data).tolist()

    def check(what, got, expected):
        assert got == expected, f"{what} gave {got}, expected {expected}"

    x, y = bf16(1.5, -2.0), bf16(2.25, 3.0)
    check("bf16 add", value(b.create_fadd(x, y)), [3.75, 1.0])
    check("bf16 mul", value(b.create_fmul(x, y)), [3.375, -6.0])
    check("bf16 exp", value(b.create_exp(bf16(0.0, 1.0))), [1.0, 2.71875])
    check("bf16 compare", b.create_fcmpOLT(x, y).data.tolist(), [True, True])
    check("bf16 max", value(b.create_maxnumf(x, y)), [2.25, 3.0])
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to the even 1.0
    fp32 = TensorHandle(np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], dtype=np.float32), tl.float32)
    check("fp32 -> bf16 cast", value(b.create_fp_trunc(fp32, tl.bfloat16)), [1.0, 1.015625])
    widened = b.create_fp_ext(x, tl.float32)
    check("bf16 -> fp32 cast", widened.data.tolist(), [1.5, -2.0])
    a = TensorHandle(fp32_to_bf16_bits(np.array([[1.5, -2.0]], dtype=np.float32)), tl.bfloat16)
    w = TensorHandle(fp32_to_bf16_bits(np.array([[2.0], [0.25]], dtype=np.float32)), tl.bfloat16)
    acc = TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    check("bf16 dot", b.create_dot(a, w, acc, None, 0).data.tolist(), [[2.5]])
    row = tl.core.tensor(bf16(1.5, -2.0, 0.25, -0.5), tl.block_type(tl.bfloat16, [4]))
    total = interp.ReduceOps(0, tl.standard._sum_combine, False).sum(row)
    check("bf16 sum", value(total.handle), [-0.75])
