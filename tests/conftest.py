"""Shared test setup.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when
a kernel is defined), so it is set in pytest_configure, before collection:
- the default run (CPU tests) turns the interpreter on, so the CPU tests reach the real
  kernels with ``gptfast.use_backend("triton")`` on CPU tensors;
- a run that selects the ``gpu`` marker (``pytest -m gpu``) on a machine with CUDA leaves it
  off, so the kernels are compiled for the GPU.
An explicit TRITON_INTERPRET in the environment always wins. Tests marked ``gpu`` skip
without CUDA. In interpreter mode gptfast.testing.enable_interpreter_bf16() then makes the
interpreter compute bfloat16 by value (it is a no-op otherwise), so the kernel tests run bf16
on CPU too.
"""

import importlib.util
import os
import sys

import pytest
import torch

import gptfast


def pytest_configure(config):
    # Nothing may import triton before this point: it reads TRITON_INTERPRET when imported.
    markexpr = config.getoption("markexpr", default="") or ""
    wants_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    os.environ.setdefault("TRITON_INTERPRET", "0" if wants_gpu and torch.cuda.is_available() else "1")
    if importlib.util.find_spec("triton") is not None:
        gptfast.testing.enable_interpreter_bf16()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_and_seed():
    """Every test starts from backend "auto" and a fixed seed."""
    torch.manual_seed(0)
    with gptfast.use_backend("auto"):
        yield


@pytest.fixture
def triton_backend():
    """Run the test body with the Triton kernels forced (interpreter on CPU)."""
    pytest.importorskip("triton")
    with gptfast.use_backend("triton"):
        yield


@pytest.fixture
def uninstall(monkeypatch):
    """uninstall("pkg"): imports of pkg and of every submodule fail, as if it were not installed.

    Submodules already imported by an earlier test are hidden too: ``import pkg.sub`` finds
    ``sys.modules["pkg.sub"]`` without looking at its parent.
    """
    def hide(package):
        for name in [package, *(m for m in sys.modules if m.startswith(package + "."))]:
            monkeypatch.setitem(sys.modules, name, None)
    return hide
