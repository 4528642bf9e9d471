"""pytest setup of bench/test_microbench.py: without pytest-benchmark, one line naming the extra
(instead of pytest's "unrecognized arguments: --benchmark-only")."""

import pytest

from gptfast.extras import install_hint, is_installed


def pytest_addoption(parser):
    # runs as this file is loaded, before pytest checks the command line's options
    if not is_installed("pytest_benchmark"):
        raise pytest.UsageError("bench/test_microbench.py needs pytest-benchmark, which is not "
                                f"installed: {install_hint('pytest_benchmark')}")
