"""Optional dependencies: which extra of gptfast-kernels installs each one, and the one-line
error (:class:`MissingExtra`) raised where one is needed and not installed.

Import an optional package with its import statement inside :func:`optional_import`, so the
statement stays visible to tests/test_dependencies.py (which checks every such import path
against the installed versions)::

    with optional_import("safetensors", "reading model.safetensors"):
        from safetensors.torch import load_file
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util

DISTRIBUTION = "gptfast-kernels"

# top-level module -> (its distribution on PyPI, the extra of gptfast-kernels that installs it
# or None where no extra does, what gptfast uses it for). Liger is an optional peer of the
# benchmarks, never a dependency.
OPTIONAL = {
    "matplotlib": ("matplotlib", "bench", "the PNG plots of gptfast bench"),
    "safetensors": ("safetensors", "hf", "loading Hugging Face GPT-2 weights (model.safetensors)"),
    "huggingface_hub": ("huggingface-hub", "hf", "GPT.from_pretrained('gpt2') downloads"),
    "transformers": ("transformers", "test", "patching Hugging Face models; tests against them"),
    "pytest": ("pytest", "test", "the tests and bench/test_microbench.py"),
    "pytest_benchmark": ("pytest-benchmark", "test", "bench/test_microbench.py"),
    "liger_kernel": ("liger-kernel", None, "Liger as a peer in the kernel benchmarks"),
    "flash_attn": ("flash-attn", None, "FA2 as a peer in the nanochat attention benchmark"),
    "flash_attn_interface": ("flash_attn_3", None, "FA3 (built from flash-attention's hopper/) "
                             "as a peer in the nanochat attention benchmark"),
    "kernels": ("kernels", None, "FA3 from the Hugging Face kernels hub (cached, never "
                "downloaded by the benchmark) as a peer in the nanochat attention benchmark"),
}


def install_hint(module: str) -> str:
    """The pip command that installs ``module`` (a top-level module name of OPTIONAL)."""
    distribution, extra, _ = OPTIONAL[module]
    return f'pip install "{DISTRIBUTION}[{extra}]"' if extra else f"pip install {distribution}"


def installed_versions() -> dict:
    """module -> the installed version of its distribution, or None (from the package
    metadata; nothing is imported)."""
    versions = {}
    for module, (distribution, _, _) in OPTIONAL.items():
        try:
            versions[module] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    return versions


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says what needs it and how to
    install it, in one line. An ImportError, so ``except ImportError`` still catches it."""

    def __init__(self, module: str, purpose: str):
        self.module, self.purpose, self.hint = module, purpose, install_hint(module)
        super().__init__(f"{purpose} needs {module}, which is not installed: {self.hint}",
                         name=module)


@contextlib.contextmanager
def optional_import(module: str, purpose: str):
    """Turn "``module`` is not installed" inside the block into :class:`MissingExtra`.

    Only the package itself missing is converted: a submodule or a name gone from an installed
    package (a new release that broke an import path) keeps its own error.
    """
    if module not in OPTIONAL:
        raise ValueError(f"{module!r} is not an optional dependency listed in OPTIONAL")
    try:
        yield
    except ModuleNotFoundError as err:
        inside = err.name is not None and (err.name == module or err.name.startswith(module + "."))
        if not inside or is_installed(module):
            raise
        raise MissingExtra(module, purpose) from None


def is_installed(module: str) -> bool:
    """Whether the top-level ``module`` can be imported (False also when sys.modules blocks it
    with None, as tests do to simulate an uninstalled package)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False
