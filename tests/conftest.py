"""Shared test setup.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when
a kernel is defined), so it is set here, first. CPU tests then reach the real kernels with
``gptfast.use_backend("triton")``. Tests marked ``gpu`` skip without CUDA.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import gptfast  # noqa: E402


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
