"""Backend selection: use_backend as call and context manager, GPTFAST_BACKEND, "auto" rules."""

import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import backend


def test_use_backend_as_context_manager_restores_previous():
    assert gptfast.get_backend() == "auto"
    with gptfast.use_backend("reference"):
        assert gptfast.get_backend() == "reference"
        with gptfast.use_backend("TRITON"):
            assert gptfast.get_backend() == "triton"
        assert gptfast.get_backend() == "reference"
    assert gptfast.get_backend() == "auto"


def test_use_backend_as_plain_call_sticks():
    gptfast.use_backend("reference")
    assert gptfast.get_backend() == "reference"
    gptfast.use_backend("auto")
    assert gptfast.get_backend() == "auto"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        gptfast.use_backend("cuda")


def test_environment_sets_the_default():
    code = "import gptfast; print(gptfast.get_backend())"
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**_env(), "GPTFAST_BACKEND": "reference"}, check=True)
    assert env_out.stdout.strip() == "reference"
    bad = subprocess.run([sys.executable, "-c", "import gptfast, torch; gptfast.layer_norm(torch.ones(2))"],
                         capture_output=True, text=True, env={**_env(), "GPTFAST_BACKEND": "fastest"})
    assert bad.returncode != 0 and "GPTFAST_BACKEND must be one of" in bad.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "GPTFAST_BACKEND"}


def test_forcing_triton_for_an_op_without_kernel_says_so():
    assert backend.registered_kernel("unit_test_unregistered") is None
    with gptfast.use_backend("triton"), pytest.raises(
            gptfast.BackendUnavailable, match="no Triton kernel for unit_test_unregistered yet"):
        backend.choose("unit_test_unregistered", torch.device("cuda"))
    assert backend.describe("unit_test_unregistered", torch.device("cpu")).startswith(
        "reference (no Triton kernel")


def test_forcing_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with gptfast.use_backend("triton"), pytest.raises(gptfast.BackendUnavailable,
                                                      match="set TRITON_INTERPRET=1"):
        gptfast.layer_norm(torch.ones(2, 3))


def test_choose_rules_for_a_registered_kernel(monkeypatch):
    backend.register_kernel("unit_test_op", "math:sqrt", "gptfast.backend:_test_only_unsupported")
    monkeypatch.setattr(backend, "_test_only_unsupported", lambda *a: "too big" if a[0] > 1 else None,
                        raising=False)
    try:
        cpu, meta = torch.device("cpu"), torch.device("meta")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.choose("unit_test_op", cpu, (0,)) == (
            "reference", "auto uses triton only for CUDA tensors")
        with gptfast.use_backend("triton"):
            assert backend.choose("unit_test_op", cpu, (0,)) == ("triton", None)
            with pytest.raises(gptfast.BackendUnavailable, match="too big"):
                backend.choose("unit_test_op", cpu, (2,))
            with pytest.raises(gptfast.BackendUnavailable, match="tensors are on meta"):
                backend.choose("unit_test_op", meta, (0,))
        with gptfast.use_backend("reference"):
            assert backend.choose("unit_test_op", cpu, (0,))[0] == "reference"
    finally:
        backend._KERNELS.pop("unit_test_op")


def test_a_kernel_module_that_fails_to_import_is_reported(monkeypatch):
    backend.register_kernel("unit_test_broken", "gptfast.no_such_module:fn")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        reason = backend.triton_unavailable("unit_test_broken", torch.device("cpu"))
        assert "failed to import" in reason and "no_such_module" in reason
    finally:
        backend._KERNELS.pop("unit_test_broken")


def test_describe_explains_every_op():
    cpu = torch.device("cpu")
    for op in ("layer_norm", "add_layer_norm", "causal_attention", "cross_entropy",
               "linear_cross_entropy"):
        assert "no CUDA device" in backend.describe(op, cpu)


def test_import_is_light():
    code = ("import sys, gptfast; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "assert 'gptfast.model' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


COLD_COMPILE = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys, torch, gptfast

def block(x, w, q, k, v):
    # ops from three kernel modules, each loaded for the first time inside the trace
    y = gptfast.layer_norm(x, w)
    y2, _ = gptfast.add_layer_norm(x, x, w)
    o = gptfast.causal_attention(q, k, v)
    loss = gptfast.linear_cross_entropy(x, w.expand(3, 8), torch.tensor([0, 1, 2, 1]))
    return y.sum() + y2.sum() + o.sum() + loss

args = [torch.randn(4, 8), torch.randn(8), torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16),
        torch.randn(1, 1, 5, 16)]
args = [a.requires_grad_() for a in args]
with gptfast.use_backend("triton"):
    assert "gptfast.kernels.layernorm" not in sys.modules  # nothing loaded before tracing
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    out.backward()
with gptfast.use_backend("reference"):
    expected = block(*[a.detach() for a in args])
torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_first_call_inside_torch_compile_loads_kernels_without_graph_break():
    """A cold process whose first op call is inside torch.compile(fullgraph=True)."""
    out = subprocess.run([sys.executable, "-c", COLD_COMPILE], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
