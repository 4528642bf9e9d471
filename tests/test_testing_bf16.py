"""gptfast.testing.enable_interpreter_bf16: Triton's interpreter computes bf16 by value.

Small kernels written here run through the interpreter (tests/conftest.py turns it and the
shim on) and are compared with torch's own bf16 arithmetic on CPU, which widens to fp32 and
rounds the result to nearest even, as the GPU does. One test runs the same dot kernel in a
fresh process without the shim and shows the interpreter's raw answer is off by orders of
magnitude.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gptfast
from gptfast.testing import bf16_tolerance, enable_interpreter_bf16, interpreter_bf16_enabled

triton = pytest.importorskip("triton")
tl = triton.language

BF16 = torch.bfloat16
BLOCK = 1024
# inf and NaN inputs are on purpose: numpy's warnings about them are expected
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture(autouse=True)
def _needs_shim():
    if not interpreter_bf16_enabled():
        pytest.skip("runs kernels through the interpreter with the bf16 shim (TRITON_INTERPRET=1)")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                ROUND_TO_BF16: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    acc = tl.dot(a, b)  # bf16 x bf16, fp32 accumulator
    if ROUND_TO_BF16:
        acc = acc.to(tl.bfloat16)
    tl.store(c_ptr + m[:, None] * N + n[None, :], acc)


@triton.jit
def _dot_acc_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """Two dots into one fp32 accumulator, the second on a bf16 tile made in-kernel."""
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    acc = tl.zeros((M, N), dtype=tl.float32) + 1.0
    acc = tl.dot(a, b, acc)
    acc = tl.dot((a.to(tl.float32) * 0.5).to(tl.bfloat16), b, acc)
    tl.store(c_ptr + m[:, None] * N + n[None, :], acc)


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    if OP == "add":
        r = x + y
    elif OP == "sub":
        r = x - y
    elif OP == "mul":
        r = x * y
    elif OP == "exp":  # tl.exp takes fp32/fp64 only (on the GPU too): kernels widen first
        r = tl.exp(x.to(tl.float32)).to(tl.bfloat16)
    elif OP == "maximum":
        r = tl.maximum(x, y)
    elif OP == "where_less":
        r = tl.where(x < y, x, y)
    elif OP == "neg":
        r = -x
    else:  # "fma": x * y + x, rounded once per op like the GPU's separate mul and add
        r = x * y + x
    tl.store(out_ptr + offs, r, mask=mask)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, RTZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask)
    if RTZ:
        y = x.to(dst_ptr.dtype.element_ty, fp_downcast_rounding="rtz")
    else:
        y = x.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + offs, y, mask=mask)


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, N: tl.constexpr):
    """Row 0: sum, max, min of a bf16 row (kept in bf16); row 1: the fp32 sum of it."""
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + 0, tl.sum(x, axis=0))
    tl.store(out_ptr + 1, tl.max(x, axis=0))
    tl.store(out_ptr + 2, tl.min(x, axis=0))
    tl.store(out_ptr + 3, tl.full((), 2.5, tl.bfloat16) * tl.max(x, axis=0))


@triton.jit
def _atomic_add_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.atomic_add(out_ptr + offs, tl.load(x_ptr + tl.program_id(0) * N + offs))


def _bits(t):
    return t.view(torch.int16)


def _assert_same_bf16(got, want, zero_sign=True):
    """Bit-identical bf16, except that any NaN matches any NaN (and -0 matches 0 if not zero_sign)."""
    assert got.dtype == want.dtype == BF16
    both_nan = got.isnan() & want.isnan()
    differ = (_bits(got) != _bits(want)) & ~both_nan
    if not zero_sign:
        differ &= ~((got == 0) & (want == 0))
    assert not differ.any(), (f"{int(differ.sum())} of {got.numel()} differ, e.g. "
                              f"{got[differ][:5].tolist()} vs {want[differ][:5].tolist()}")


def _run_elementwise(op, x, y):
    out = torch.empty_like(x)
    _elementwise_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, out, x.numel(), OP=op, BLOCK=BLOCK)
    return out


def _cast(src, dtype, rtz=False):
    dst = torch.empty(src.shape, dtype=dtype)
    _cast_kernel[(triton.cdiv(src.numel(), BLOCK),)](src, dst, src.numel(), RTZ=rtz, BLOCK=BLOCK)
    return dst


def _edge_bf16(n, seed):
    """Random bf16 of every magnitude plus 0, -0, +-inf, NaN, subnormals and the extremes."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-130, 127, (n,), generator=gen).float())
    x = (torch.randn(n, generator=gen) * scale).to(BF16)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-39, -3e-40,
                            9.2e-41, 3.3895e38, -3.3895e38, 1.0, -1.0], dtype=BF16)
    x[: special.numel()] = special
    return x


def test_enable_is_idempotent_and_public():
    assert gptfast.testing.enable_interpreter_bf16 is enable_interpreter_bf16
    assert enable_interpreter_bf16() is True
    assert enable_interpreter_bf16() is True
    assert interpreter_bf16_enabled()


def test_bf16_tolerance_scales_fp16_tolerances_by_the_roundoff_ratio():
    assert bf16_tolerance(1e-3) == pytest.approx(8e-3)
    assert bf16_tolerance((3e-3, 1e-2)) == pytest.approx((2.4e-2, 8e-2))
    assert bf16_tolerance(dict(atol=2e-3, rtol=1e-3)) == pytest.approx(dict(atol=1.6e-2, rtol=8e-3))
    with pytest.raises(TypeError, match="fp16_tolerance"):
        bf16_tolerance("1e-3")


@pytest.mark.parametrize("shape", [(16, 16, 32), (32, 16, 64)])
def test_dot_bf16_inputs_fp32_accumulate(shape):
    m, n, k = shape
    a = (torch.randn(m, k) * 3).to(BF16)
    b = (torch.randn(k, n) * 3).to(BF16)
    got = torch.empty(m, n)
    _dot_kernel[(1,)](a, b, got, m, n, k, ROUND_TO_BF16=False)
    want = a.double() @ b.double()  # bf16 products are exact in fp32; only the fp32 sums round
    bound = k * 2.0**-24 * (a.double().abs() @ b.double().abs())
    assert ((got.double() - want).abs() <= bound).all()
    torch.testing.assert_close(got, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


def test_dot_rounded_to_bf16_matches_torch_bf16_matmul():
    a = torch.randn(32, 64).to(BF16)
    b = torch.randn(64, 16).to(BF16)
    got = torch.empty(32, 16, dtype=BF16)
    _dot_kernel[(1,)](a, b, got, 32, 16, 64, ROUND_TO_BF16=True)
    want = a @ b  # torch's CPU bf16 matmul: fp32 accumulate, one rounding to bf16
    exact = a.double() @ b.double()
    # fp32 sums in another order may land on the other side of a bf16 rounding boundary
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert ((got.double() - exact).abs() <= ulp).all()
    assert (got == want).float().mean() > 0.95


def test_dot_into_an_accumulator_and_in_kernel_bf16_tiles():
    a = torch.randn(16, 32).to(BF16)
    b = torch.randn(32, 16).to(BF16)
    got = torch.empty(16, 16)
    _dot_acc_kernel[(1,)](a, b, got, 16, 16, 32)
    want = 1.0 + a.double() @ b.double() + (a.double() * 0.5) @ b.double()  # a * 0.5 is exact
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_dot_with_bf16_out_dtype_is_rejected_as_on_gpu():
    """Triton's frontend refuses out_dtype=bfloat16 (no bf16-accumulating MMA); the shim keeps that."""
    @triton.jit
    def dot_out_bf16(a_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, a, out_dtype=tl.bfloat16))

    a = torch.randn(16, 16).to(BF16)
    c = torch.empty(16, 16, dtype=BF16)
    try:
        dot_out_bf16[(1,)](a, c, 16)
    except Exception as err:  # triton wraps frontend errors in its own types
        assert "bfloat16" in str(err) or "bf16" in str(err)
    else:  # a triton that accepts it must give the fp32 product rounded to bf16
        exact = a.double() @ a.double()
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
        assert ((c.double() - exact).abs() <= ulp).all()


@pytest.mark.parametrize("op", ["add", "sub", "mul", "fma", "maximum", "where_less", "neg"])
def test_elementwise_bf16_matches_torch(op):
    x, y = _edge_bf16(3000, 1), _edge_bf16(3000, 2)
    want = {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
            "fma": lambda: x * y + x, "maximum": lambda: torch.maximum(x, y),
            "where_less": lambda: torch.where(x < y, x, y), "neg": lambda: -x}[op]()
    # triton < 3.8 lowers -x to 0 - x (so -(+0) is +0 there, on the GPU too)
    _assert_same_bf16(_run_elementwise(op, x, y), want, zero_sign=op != "neg")


def test_exp_bf16_matches_torch_within_one_rounding():
    x = (torch.randn(3000) * 30).to(BF16)
    x[:4] = torch.tensor([float("-inf"), float("inf"), float("nan"), 88.5])
    got, want = _run_elementwise("exp", x, x), torch.exp(x)
    # numpy's and torch's fp32 exp may differ in the last fp32 bit, which can move the bf16
    # rounding by one step; anything else (a bit-pattern exp) is far off
    assert (got.isnan() == want.isnan()).all()
    ok = ~want.isnan()
    step = (_bits(got[ok]).int() - _bits(want[ok]).int()).abs()
    assert step.max() <= 1
    assert (step == 0).float().mean() > 0.99


def test_fp32_to_bf16_rounds_to_nearest_even():
    one = torch.tensor(1.0)
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 2 - ulp / 2])
    below, above = ties - 2.0**-20, ties + 2.0**-20
    src = torch.cat([ties, below, above, one.view(1)])
    got = _cast(src, BF16)
    assert got[:4].tolist() == [1.0, 1 + 2 * ulp, -1.0, 2.0]  # ties go to the even mantissa
    _assert_same_bf16(got, src.to(BF16))


def test_fp32_to_bf16_on_every_kind_of_bit_pattern():
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-2**31, 2**31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    src = bits.view(torch.float32).clone()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40,
                            1.1754942e-38, 3.4028235e38, -3.4e38, 3.3961e38, 65504.0, 1e-30])
    src[: special.numel()] = special
    _assert_same_bf16(_cast(src, BF16), src.to(BF16))  # subnormals, inf, NaN, overflow to inf


def test_fp32_to_bf16_toward_zero():
    src = torch.tensor([1 + 2.0**-8, -(1 + 3 * 2.0**-8), 3.4028235e38, 1e-40, float("inf")])
    got = _cast(src, BF16, rtz=True)
    want = (src.view(torch.int32) >> 16).to(torch.int16).view(BF16)  # truncate the low 16 bits
    _assert_same_bf16(got, want)


def test_bf16_to_fp32_is_exact_for_all_65536_patterns():
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(BF16)
    got = _cast(every, torch.float32)
    want = every.float()
    assert (got.isnan() == want.isnan()).all()
    keep = ~want.isnan()
    assert torch.equal(got[keep].view(torch.int32), want[keep].view(torch.int32))


def test_bf16_fp16_casts_go_through_fp32_like_torch():
    x = _edge_bf16(2000, 4)
    _assert_same_bf16(_cast(_cast(x, torch.float16), BF16), x.to(torch.float16).to(BF16))


def test_bf16_reductions_and_constants():
    x = _edge_bf16(256, 5)
    x[x.isnan() | x.isinf()] = 1.0
    x[x.abs() > 1e30] = 3.0
    got = torch.empty(4, dtype=BF16)
    _reduce_kernel[(1,)](x, got, 256)
    want_sum = x.double().sum()
    assert abs(got[0].double() - want_sum) <= 2.0**-8 * abs(want_sum) + 2.0**-7 * x.double().abs().sum() * 2**-16
    assert got[1] == x.max() and got[2] == x.min()
    assert got[3] == (2.5 * x.max().double()).to(BF16)


def test_bf16_atomic_add():
    x = (torch.randn(4, 64) * 2).to(BF16)
    out = torch.zeros(64, dtype=BF16)
    _atomic_add_kernel[(4,)](x, out, 64)
    want = torch.zeros(64, dtype=BF16)
    for row in x:  # the interpreter runs programs in order; each add rounds to bf16
        want = want + row
    _assert_same_bf16(out, want)


# One fresh process (importing torch and triton takes seconds) checks, in order: with the
# interpreter off, enable_interpreter_bf16() is a no-op that imports nothing; the interpreter
# alone gets a bf16 dot wrong; the shim refuses loudly to install on an interpreter missing a
# method it patches, or one whose add no longer goes through what it patches; then it installs
# and the same dot is right.
_FRESH_PROCESS = textwrap.dedent("""
    import os, sys
    import gptfast
    assert "triton" not in sys.modules and "gptfast.testing" not in sys.modules
    from gptfast.testing import bf16_tolerance, enable_interpreter_bf16, interpreter_bf16_enabled
    print("noop", enable_interpreter_bf16(), interpreter_bf16_enabled(), "triton" in sys.modules)

    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch, triton, triton.language as tl
    from triton.runtime import interpreter as interp

    @triton.jit
    def dot(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    def dot_error():
        a = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        c = torch.empty(16, 16)
        dot[(1,)](a, a, c, 16)
        return float((c.double() - a.double() @ a.double()).abs().max())

    print("without", dot_error())

    saved = interp.InterpreterBuilder.cast_impl
    del interp.InterpreterBuilder.cast_impl
    try:
        enable_interpreter_bf16()
    except RuntimeError as err:
        print("missing", f"triton {triton.__version__}" in str(err) and "cast_impl" in str(err))
    interp.InterpreterBuilder.cast_impl = saved

    fadd = interp.InterpreterBuilder.create_fadd
    interp.InterpreterBuilder.create_fadd = (
        lambda self, lhs, rhs: interp.TensorHandle(np.add(lhs.data, rhs.data), lhs.dtype))
    try:
        enable_interpreter_bf16()
    except RuntimeError as err:
        print("probe", f"triton {triton.__version__}" in str(err) and "bf16 add" in str(err),
              interpreter_bf16_enabled(),
              interp.InterpreterBuilder.binary_op.__qualname__.startswith("InterpreterBuilder"))
    interp.InterpreterBuilder.create_fadd = fadd

    print("enabled", enable_interpreter_bf16(), enable_interpreter_bf16())
    print("with", dot_error())
""")


@pytest.fixture(scope="module")
def fresh_process():
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True,
                          env=environ, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}


def test_the_shim_is_what_makes_bf16_dot_right(fresh_process):
    """The interpreter alone multiplies bf16 bit patterns; the same kernel is right with the shim."""
    assert float(fresh_process["without"][0]) > 1e3
    assert fresh_process["enabled"] == ["True", "True"]
    assert float(fresh_process["with"][0]) < 1e-4


def test_noop_and_nothing_imported_without_the_interpreter(fresh_process):
    assert fresh_process["noop"] == ["False", "False", "False"]


def test_fails_loudly_when_the_interpreter_internals_change(fresh_process):
    assert fresh_process["missing"] == ["True"]
    # the probe failed, so the patch was undone
    assert fresh_process["probe"] == ["True", "False", "True"]
