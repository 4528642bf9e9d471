"""The Triton causal attention kernels against gptfast.reference in fp64.

CPU tests run the real kernels through the Triton interpreter (fp32, fp16, and bf16 by value
through gptfast.testing.enable_interpreter_bf16, which tests/conftest.py turns on); large
shapes and the tuned GPU configs are in the ``gpu`` tests.
"""

import pytest
import torch

import gptfast
from gptfast import reference
from gptfast.testing import bf16_tolerance

attention = pytest.importorskip("gptfast.kernels.attention")

# (output, gradients) tolerance, used as both atol and rtol, by input dtype
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (3e-3, 8e-3)}
TOLERANCE[torch.bfloat16] = bf16_tolerance(TOLERANCE[torch.float16])
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


def make_qkv(batch, heads, kv_heads, seq, head_dim, dtype=torch.float32, device="cpu"):
    shape_q, shape_kv = (batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim)
    return tuple(torch.randn(shape, dtype=dtype, device=device).requires_grad_()
                 for shape in (shape_q, shape_kv, shape_kv))


def reference_fp64(q, k, v, grad_out, scale=None):
    """Output and (dq, dk, dv) of the reference op on fp64 copies of the inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.causal_attention(q64, k64, v64, scale)
    out.backward(grad_out.double())
    return out.detach(), (q64.grad, k64.grad, v64.grad)


def run_kernel(q, k, v, grad_out, scale=None):
    for t in (q, k, v):
        t.grad = None
    out = gptfast.causal_attention(q, k, v, scale)
    out.backward(grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


def assert_matches_reference(q, k, v, scale=None):
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    out, grads = run_kernel(q, k, v, grad_out, scale)
    expected_out, expected_grads = reference_fp64(q, k, v, grad_out, scale)
    out_tol, grad_tol = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected_out, atol=out_tol, rtol=out_tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert got.dtype == q.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=grad_tol, rtol=grad_tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# (batch, heads, kv_heads, seq, head_dim, scale)
CASES = {
    "B2-H3-T77-D32": (2, 3, 3, 77, 32, None),
    "T1": (1, 2, 2, 1, 32, None),
    "T130-D64": (1, 2, 2, 130, 64, None),
    "T64-block-multiple": (1, 2, 2, 64, 32, None),
    "D80-padded": (1, 2, 2, 45, 80, None),
    "D24-below-16-pad": (1, 1, 1, 20, 24, None),
    "GQA-H4-Hkv2": (1, 4, 2, 77, 32, None),
    "MQA-H4-Hkv1": (1, 4, 1, 50, 32, None),
    "custom-scale": (1, 2, 2, 40, 32, 0.3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_matches_reference(triton_backend, case):
    *shape, scale = case
    assert_matches_reference(*make_qkv(*shape), scale=scale)


FP16_CASES = ["B2-H3-T77-D32", "T1", "D80-padded", "GQA-H4-Hkv2", "custom-scale"]


@HALF
@pytest.mark.parametrize("case", FP16_CASES)
def test_half_precision_matches_reference(triton_backend, case, dtype):
    *shape, scale = CASES[case]
    assert_matches_reference(*make_qkv(*shape, dtype=dtype), scale=scale)


def test_noncontiguous_qkv_from_fused_projection(triton_backend):
    """q, k, v as split + transpose views of one (B, T, 3, H, D) tensor, gradients into it."""
    batch, seq, heads, head_dim = 2, 37, 2, 32
    qkv = torch.randn(batch, seq, 3, heads, head_dim, requires_grad=True)
    q, k, v = (t.squeeze(2).transpose(1, 2) for t in qkv.split(1, dim=2))
    assert not q.is_contiguous()
    grad_out = torch.randn(batch, heads, seq, head_dim)
    out = gptfast.causal_attention(q, k, v)
    out.backward(grad_out)

    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (t.squeeze(2).transpose(1, 2) for t in qkv64.split(1, dim=2))
    expected = reference.causal_attention(q64, k64, v64)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=1e-4, rtol=1e-4)


def test_output_is_stored_seq_major(triton_backend):
    """O comes back (B, T, H, D)-major, so o.transpose(1, 2).reshape(B, T, H*D) is a view."""
    q, k, v = make_qkv(1, 2, 2, 20, 16)
    with torch.no_grad():  # the inference path, without autograd
        out = gptfast.causal_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, reference.causal_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_first_row_sees_only_the_first_key(triton_backend):
    """Query 0 attends only to key 0: its output is exactly v[..., 0, :] of its kv head."""
    q, k, v = make_qkv(1, 4, 2, 33, 32)
    q.data[:, :, 0] *= 50.0  # large logits must not matter when one key is visible
    out = gptfast.causal_attention(q, k, v)
    assert torch.equal(out[:, :, 0], v.detach().repeat_interleave(2, dim=1)[:, :, 0])


def test_backward_is_bitwise_deterministic(triton_backend):
    q, k, v = make_qkv(1, 4, 2, 70, 32)
    grad_out = torch.randn(q.shape)
    first = run_kernel(q, k, v, grad_out)[1]
    first = [g.clone() for g in first]
    second = run_kernel(q, k, v, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# head dim 16: dS K with BLOCK_M as M; 32 and 24 (padded to 32): dQ^T = K^T dS^T, added
# through transposed pointers (the interpreter's dK/dV query step is 16 rows).
@pytest.mark.parametrize("head_dim", [16, 24, 32])
def test_atomic_dq_path_matches_reference(triton_backend, monkeypatch, head_dim):
    assert attention.atomic_dq_enabled() is False, "the atomic dQ path must be off by default"
    monkeypatch.setattr(attention, "_attn_bwd_dq", None)  # the dQ kernel must not run
    previous = attention.set_atomic_dq(True)
    try:
        assert attention.atomic_dq_enabled()
        assert_matches_reference(*make_qkv(1, 4, 2, 45, head_dim))
    finally:
        attention.set_atomic_dq(previous)
    assert attention.atomic_dq_enabled() is False


def test_atomic_dq_above_head_dim_128_runs_the_deterministic_backward(triton_backend):
    """No atomic dK/dV config fits sm_90's registers at BLOCK_D 256, so set_atomic_dq(True)
    gives the deterministic kernels there: the same bits as with it off, and the reference."""
    assert attention.ATOMIC_DQ_MAX_BLOCK_D == 128
    q, k, v = make_qkv(1, 2, 1, 9, 136)
    grad_out = torch.randn(q.shape)
    previous = attention.set_atomic_dq(True)
    try:
        atomic = [g.clone() for g in run_kernel(q, k, v, grad_out)[1]]
    finally:
        attention.set_atomic_dq(previous)
    deterministic = run_kernel(q, k, v, grad_out)[1]
    for got, want in zip(atomic, deterministic):
        assert torch.equal(got, want)
    for got, want in zip(atomic, reference_fp64(q, k, v, grad_out)[1]):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.fixture
def descriptors_made(monkeypatch):
    """The kernels' data path set to tensor descriptors (TMA) in the interpreter; counts the
    descriptors the interpreted kernels build."""
    from triton.runtime import interpreter
    made = []
    build = interpreter.InterpreterBuilder.create_make_tensor_descriptor

    def counting(self, *args, **kwargs):
        made.append(args[0])
        return build(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_make_tensor_descriptor", counting)
    monkeypatch.setattr(attention, "_INTERPRET_TMA", True)
    return made


TMA_CASES = ["B2-H3-T77-D32", "T1", "T130-D64", "T64-block-multiple", "D80-padded", "GQA-H4-Hkv2"]


@pytest.mark.parametrize("case", TMA_CASES)
def test_tma_path_matches_reference(triton_backend, descriptors_made, case):
    """Tensor-descriptor loads pad rows >= T and columns >= head dim with zeros, as the masks
    of the pointer path do: the same answer, on every kernel."""
    *shape, scale = CASES[case]
    assert_matches_reference(*make_qkv(*shape), scale=scale)
    assert descriptors_made, "the TMA path built no tensor descriptor"


@HALF
def test_tma_path_half_precision_and_atomic_dq(triton_backend, descriptors_made, dtype):
    assert_matches_reference(*make_qkv(1, 4, 2, 45, 32, dtype=dtype))
    previous = attention.set_atomic_dq(True)
    try:
        assert_matches_reference(*make_qkv(1, 4, 2, 45, 32))
    finally:
        attention.set_atomic_dq(previous)


def test_tma_path_reads_fused_projection_in_place(triton_backend, descriptors_made):
    """q, k, v split from a (B, T, 3, H, D) tensor: row stride 3 H D elements, aligned."""
    batch, seq, heads, head_dim = 2, 37, 2, 32
    qkv = torch.randn(batch, seq, 3, heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert attention._tma_ok(q, k, v)
    assert_matches_reference(*(t.requires_grad_() for t in (q, k, v)))
    assert descriptors_made


def _misaligned(batch, heads, seq, head_dim, dtype=torch.float32):
    """Leaves of shape (B, H, T, D) whose data starts one element past a 16-byte boundary."""
    storage = torch.randn(batch * heads * seq * head_dim + 1, dtype=dtype)
    return storage[1:].view(batch, heads, seq, head_dim).detach().requires_grad_()


@pytest.mark.parametrize("layout", ["misaligned-base", "row-stride-not-16-bytes",
                                    "head-dim-strided"])
def test_inputs_a_descriptor_cannot_take_fall_back_to_pointers(triton_backend,
                                                               descriptors_made, layout):
    if layout == "misaligned-base":
        q, k, v = (_misaligned(1, 2, 33, 16) for _ in range(3))
    elif layout == "row-stride-not-16-bytes":  # fp16, head dim 20: 40-byte rows
        q, k, v = make_qkv(1, 2, 2, 33, 20, dtype=torch.float16)
    else:  # (B, H, D, T) storage seen as (B, H, T, D): the head dim is not contiguous
        q, k, v = (torch.randn(1, 2, 16, 33).transpose(2, 3).requires_grad_() for _ in range(3))
    assert not attention._tma_ok(q, k, v)
    assert_matches_reference(q, k, v)
    assert descriptors_made == []


def test_tma_ok_rules():
    aligned = torch.empty(2, 3, 5, 8)
    assert attention._tma_ok(aligned)
    assert not attention._tma_ok(torch.empty(2, 3, 5, 9)[..., :8])  # 36-byte rows
    assert not attention._tma_ok(torch.empty(2, 3, 5, 8).transpose(2, 3))
    assert not attention._tma_ok(torch.empty(2 * 3 * 5 * 8 + 2)[2:].view(2, 3, 5, 8))
    # a size-1 batch or head dim's stride is never used; the row stride always is
    assert attention._tma_ok(torch.empty(1, 3, 5, 8).as_strided((1, 3, 5, 8), (7, 40, 8, 1)))
    assert not attention._tma_ok(torch.empty(2, 3, 1, 8).as_strided((2, 3, 1, 8), (24, 8, 7, 1)))


@pytest.fixture
def persistent_grids(monkeypatch):
    """The forward set to its persistent grid in the interpreter, sized for 2 SMs (so every
    program loops over several tiles); records the grids launched."""
    grids = []
    tile_grid = attention._tile_grid

    def recording(*args):
        grids.append(tile_grid(*args))
        return grids[-1]

    monkeypatch.setattr(attention, "_tile_grid", recording)
    monkeypatch.setattr(attention, "_INTERPRET_PERSISTENT", 1)
    monkeypatch.setattr(attention, "_DEFAULT_SM_COUNT", 2)
    return grids


def _forward(q, k, v, document_ids=None, window=None):
    return attention.attention_forward(q.detach(), k.detach(), v.detach(), q.shape[-1] ** -0.5,
                                       document_ids=document_ids, window=window)


PERSISTENT_CASES = {  # (batch, heads, kv_heads, seq, head_dim, dtype, document starts, window)
    "B2-H3-T77-D32": (2, 3, 3, 77, 32, torch.float32, None, None),
    "GQA-H4-Hkv2-T45-fp16": (1, 4, 2, 45, 32, torch.float16, None, None),
    "GQA-H4-Hkv2-T45-bf16": (1, 4, 2, 45, 32, torch.bfloat16, None, None),
    "D80-padded": (1, 2, 2, 45, 80, torch.float32, None, None),
    "docs-window-GQA": (2, 4, 2, 75, 16, torch.float32, [7, 30, 31], 13),
}


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", PERSISTENT_CASES.values(), ids=PERSISTENT_CASES.keys())
def test_persistent_forward_matches_reference_and_tiled_grid(triton_backend, monkeypatch,
                                                             persistent_grids, case, tma):
    """Two programs loop over all (batch * head, query block) tiles: the fp64 reference's
    answer, and bit for bit the one-program-per-tile grid's (the same tile body)."""
    batch, heads, kv_heads, seq, head_dim, dtype, starts, window = case
    monkeypatch.setattr(attention, "_INTERPRET_TMA", tma)
    q, k, v = make_qkv(batch, heads, kv_heads, seq, head_dim, dtype=dtype)
    ids = None
    if starts is not None:
        begins = torch.zeros(seq, dtype=torch.long)
        begins[starts] = 1
        ids = torch.cumsum(begins, 0).expand(batch, seq).clone()
    out, lse2 = _forward(q, k, v, ids, window)
    tiles = batch * heads * -(-seq // attention._INTERPRET_BLOCKS["fwd"][0])
    assert persistent_grids == [(2,)] and tiles > 2
    expected = reference.causal_attention_math(q.double(), k.double(), v.double(), None, ids,
                                               window)
    tol = TOLERANCE[dtype][0]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    monkeypatch.setattr(attention, "_INTERPRET_PERSISTENT", 0)
    tiled_out, tiled_lse2 = _forward(q, k, v, ids, window)
    assert persistent_grids[-1] == (batch * heads, tiles // (batch * heads))
    assert torch.equal(out, tiled_out) and torch.equal(lse2, tiled_lse2)


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["deterministic", "atomic_dq"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_persistent_backward_matches_reference(triton_backend, monkeypatch, persistent_grids,
                                               tma, atomic_dq):
    """dK/dV with two programs looping over the (batch * kv head, key block) tiles, ragged T."""
    monkeypatch.setattr(attention, "_INTERPRET_TMA", tma)
    previous = attention.set_atomic_dq(atomic_dq)
    try:
        assert_matches_reference(*make_qkv(2, 4, 2, 77, 32))
    finally:
        attention.set_atomic_dq(previous)
    assert persistent_grids == [(2,), (2,)]  # forward (24 tiles), then dK/dV (12 tiles)


def test_persistent_grid_is_at_most_the_tiles():
    assert attention._tile_grid(6, 77, 32, 1, 132) == (18,)
    assert attention._tile_grid(6, 770, 32, 2, 4) == (8,)
    assert attention._tile_grid(6, 77, 32, 0, 132) == (6, 3)


def test_empty_sequence(triton_backend):
    q, k, v = make_qkv(1, 2, 2, 0, 16)
    out = gptfast.causal_attention(q, k, v)
    out.sum().backward()
    assert out.shape == (1, 2, 0, 16) and q.grad.shape == q.shape


def test_torch_compile_fullgraph_forward_and_backward():
    """The custom ops trace as single nodes: no graph break in forward or backward."""
    q, k, v = make_qkv(1, 2, 1, 24, 16)
    grad_out = torch.randn(q.shape)
    compiled = torch.compile(attention.causal_attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, 0.2)
    out.backward(grad_out)
    expected_out, expected_grads = reference_fp64(q, k, v, grad_out, 0.2)
    torch.testing.assert_close(out.detach().double(), expected_out, atol=1e-5, rtol=1e-5)
    for got, want in zip((q.grad, k.grad, v.grad), expected_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_custom_ops_pass_opcheck():
    """Schema, fake tensors (shapes and strides), autograd registration, AOT dispatch."""
    q, k, v = make_qkv(1, 2, 1, 8, 16)
    forward, backward = (torch.ops.gptfast.causal_attention_forward.default,
                         torch.ops.gptfast.causal_attention_backward.default)
    torch.library.opcheck(forward, (q, k, v, 0.25))
    out, lse2 = forward(q, k, v, 0.25)
    saved = (q.detach(), k.detach(), v.detach(), out.detach(), lse2)
    torch.library.opcheck(backward, (torch.randn_like(out), *saved, 0.25, False))


def test_torch_compile_fullgraph_through_public_dispatch(triton_backend):
    """gptfast.causal_attention (validation + backend choice + kernel) in one graph."""
    q, k, v = make_qkv(1, 2, 2, 16, 16)
    compiled = torch.compile(gptfast.causal_attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    expected_out, expected_grads = reference_fp64(q, k, v, torch.ones_like(out))
    torch.testing.assert_close(out.detach().double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad.double(), expected_grads[0], atol=1e-4, rtol=1e-4)


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 1, 1, 4, 16)
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable):
        gptfast.causal_attention(q, k, v)


def test_double_backward_raises_instead_of_dropping_second_order_terms(triton_backend):
    q, k, v = make_qkv(1, 2, 1, 5, 4)
    out = gptfast.causal_attention(q, k, v)
    loss = (out * torch.randn_like(out)).sum()  # constant upstream gradient into attention
    grads = torch.autograd.grad(loss, (q, k, v), create_graph=True)
    _, want = reference_fp64(q, k, v, torch.autograd.grad(loss, out, retain_graph=True)[0])
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        sum(g.square().sum() for g in grads).backward()


def test_unsupported_cases_have_reasons(monkeypatch):
    unsupported = attention.causal_attention_unsupported
    big = torch.empty(1, 1, 4, 512)
    assert "512" in unsupported(big, big, big)
    wide = torch.empty(1, 1, 4, 8, dtype=torch.float64)
    assert "float64" in unsupported(wide, wide, wide)
    brain = torch.empty(1, 1, 4, 8, dtype=torch.bfloat16)
    assert unsupported(brain, brain, brain) is None  # the conftest's bf16 shim is on
    monkeypatch.setitem(gptfast.testing._STATE, "enabled", False)
    assert "enable_interpreter_bf16" in unsupported(brain, brain, brain)
    ok = torch.empty(1, 1, 4, 256)
    assert unsupported(ok, ok, ok) is None


def test_forced_triton_with_unsupported_head_dim_raises():
    q, k, v = (torch.randn(1, 1, 3, 512) for _ in range(3))
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable, match="512"):
        gptfast.causal_attention(q, k, v)


# ------------------------------------------------------------------------------- GPU --

# The GPU tests need compiled kernels: conftest leaves the interpreter off for
# `pytest -m gpu` on a CUDA machine (or set TRITON_INTERPRET=0).
compiled_kernels = pytest.mark.skipif(
    attention._INTERPRET, reason="kernels are in interpreter mode; run with TRITON_INTERPRET=0")


def sdpa_error_baseline(q, k, v, grad_out, expected_out, expected_grads):
    """Max errors of torch's own SDPA in q's dtype: the yardstick for bf16/fp16 results."""
    out, grads = run_reference_low_precision(q, k, v, grad_out)
    return ((out.float() - expected_out).abs().max().item(),
            [(g.float() - w).abs().max().item() for g, w in zip(grads, expected_grads)])


def run_reference_low_precision(q, k, v, grad_out):
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = reference.causal_attention(q2, k2, v2)
    out.backward(grad_out)
    return out.detach(), (q2.grad, k2.grad, v2.grad)


def reference_fp32(q, k, v, grad_out):
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = reference.causal_attention(q32, k32, v32)
    out.backward(grad_out.float())
    return out.detach(), (q32.grad, k32.grad, v32.grad)


GPU_CASES = {
    "T1-D64": (2, 4, 4, 1, 64),
    "T17-D32-GQA": (3, 4, 2, 17, 32),
    "T1k-D64": (2, 12, 12, 1024, 64),
    "T1k-D128": (2, 8, 8, 1024, 128),
    "T777-D80": (2, 4, 4, 777, 80),
    "T333-D96-GQA": (1, 8, 2, 333, 96),
    "T100-D256": (1, 2, 2, 100, 256),
    "T4k-D128-MQA": (1, 8, 1, 4096, 128),
    "T16k-D64": (1, 4, 4, 16384, 64),
    "T16k-D128": (1, 2, 2, 16384, 128),
}


def _gpu_matches_reference(q, k, v):
    """Triton output and grads within 2x SDPA's own error (same dtype) of the fp32 reference."""
    grad_out = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    with gptfast.use_backend("triton"):
        out, grads = run_kernel(q, k, v, grad_out)
    expected_out, expected_grads = reference_fp32(q, k, v, grad_out)
    base_out, base_grads = sdpa_error_baseline(q, k, v, grad_out, expected_out, expected_grads)
    assert (out.float() - expected_out).abs().max().item() <= 2 * base_out + 1e-3
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, expected_grads, base_grads):
        err = (got.float() - want).abs().max().item()
        assert err <= 2 * base + 2e-3, f"{name}: max error {err:.3g}, SDPA's {base:.3g}"


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["deterministic", "atomic-dq"])
def test_gpu_half_precision_matches_reference(case, dtype, atomic_dq):
    q, k, v = make_qkv(*case, dtype=dtype, device="cuda")
    previous = attention.set_atomic_dq(atomic_dq)
    try:
        _gpu_matches_reference(q, k, v)
    finally:
        attention.set_atomic_dq(previous)


@pytest.mark.gpu
@compiled_kernels
def test_gpu_fp32_matches_reference():
    q, k, v = make_qkv(2, 4, 2, 300, 64, device="cuda")
    with gptfast.use_backend("triton"):
        assert_matches_reference(q, k, v)


@pytest.mark.gpu
@compiled_kernels
def test_gpu_noncontiguous_bf16():
    batch, seq, heads, head_dim = 4, 1000, 12, 64
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.squeeze(2).transpose(1, 2) for t in qkv.split(1, dim=2))
    with gptfast.use_backend("triton"):
        out = gptfast.causal_attention(q, k, v)
    expected = reference.causal_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@compiled_kernels
def test_gpu_backward_is_bitwise_deterministic():
    q, k, v = make_qkv(2, 8, 2, 2048, 128, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(q.shape, dtype=torch.bfloat16, device="cuda")
    with gptfast.use_backend("triton"):
        first = [g.clone() for g in run_kernel(q, k, v, grad_out)[1]]
        second = run_kernel(q, k, v, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


TUNERS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", ["T777-D80", "T1k-D128", "T333-D96-GQA", "T100-D256"])
def test_gpu_each_data_path_matches_reference(monkeypatch, case, tma):
    """Autotuning on one data path only: every TMA candidate that wins somewhere is right."""
    for name in TUNERS:
        tuner = getattr(attention, name)
        monkeypatch.setattr(tuner, "configs", [c for c in tuner.configs if c.kwargs["TMA"] == tma])
        monkeypatch.setattr(tuner, "cache", {})
    q, k, v = make_qkv(*GPU_CASES[case], dtype=torch.bfloat16, device="cuda")
    assert attention._tma_ok(q, k, v)
    _gpu_matches_reference(q, k, v)
    for name in TUNERS:
        assert all(c.kwargs["TMA"] == tma for c in getattr(attention, name).cache.values())


@pytest.mark.gpu
@compiled_kernels
def test_gpu_misaligned_inputs_take_the_pointer_configs(monkeypatch):
    for name in TUNERS:
        monkeypatch.setattr(getattr(attention, name), "cache", {})
    storage = torch.randn(3, 2 * 4 * 300 * 64 + 1, dtype=torch.bfloat16, device="cuda")
    q, k, v = (s[1:].view(2, 4, 300, 64).requires_grad_() for s in storage)
    assert not attention._tma_ok(q, k, v)
    _gpu_matches_reference(q, k, v)
    for name in TUNERS:
        tuner = getattr(attention, name)  # its cache holds only this test's launches
        assert tuner.cache and not any(c.kwargs["TMA"] for c in tuner.cache.values())


@pytest.mark.gpu
@compiled_kernels
def test_gpu_torch_compile_inductor():
    q, k, v = make_qkv(2, 4, 4, 512, 64, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(q.shape, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(attention.causal_attention, fullgraph=True)
    out = compiled(q, k, v)
    out.backward(grad_out)
    eager_out = attention.causal_attention(q, k, v)
    assert torch.equal(out, eager_out)
