"""Dependency drift: every import path our code uses from a third-party package still exists in
the installed release of that package.

The import paths are not listed by hand: an AST walk over gptfast/, kernels/ and bench/ collects
every ``import X`` / ``from X import Y`` (inside functions, ``try`` and ``with`` blocks too), so the
check follows the code. CI's main leg floats versions, so a new release of transformers,
huggingface_hub, safetensors, matplotlib, ... that moves or drops a name we import fails here,
naming the package, its version, the statement and where we use it, before a user meets it.
A package that is not installed is skipped, naming the extra that installs it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from gptfast.extras import OPTIONAL, install_hint, is_installed

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("gptfast", "kernels", "bench")
OURS = {"gptfast"}
# The core stack: pinned per CI leg by tests/test_versions.py and imported by every test; its
# version-dependent imports sit behind deliberate fallbacks (triton 3.6 vs 3.8), so they are
# not drift.
CORE = {"torch", "triton", "numpy"}
# Direct dependencies (pyproject's [project] dependencies) beyond the core: module -> distribution
REQUIRED = {"tiktoken": "tiktoken", "tqdm": "tqdm"}


@dataclasses.dataclass(frozen=True)
class ImportPath:
    """One absolute import statement: ``import module`` (names empty) or
    ``from module import names``, at file:line (relative to the walked root)."""

    module: str
    names: tuple
    file: str
    line: int

    @property
    def top(self) -> str:
        return self.module.partition(".")[0]

    @property
    def statement(self) -> str:
        if not self.names:
            return f"import {self.module}"
        return f"from {self.module} import {', '.join(self.names)}"


def collect_imports(root: Path, dirs=SOURCE_DIRS) -> list[ImportPath]:
    """Every absolute import in the .py files under root/dir for each dir, in file order."""
    found = []
    for directory in dirs:
        for path in sorted((root / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            where = path.relative_to(root).as_posix()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found += [ImportPath(alias.name, (), where, node.lineno)
                              for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.append(ImportPath(node.module, tuple(a.name for a in node.names),
                                            where, node.lineno))
    return sorted(found, key=lambda p: (p.file, p.line))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _import_error(path: ImportPath):
    """None when the statement would work now, else the exception it would raise."""
    try:
        module = importlib.import_module(path.module)
    except Exception as err:  # an import that raises anything is broken for us
        return err
    for name in path.names:
        if name == "*":
            continue
        try:  # lazy modules (transformers) import on attribute access and may fail there
            getattr(module, name)
            continue
        except AttributeError:
            pass
        except Exception as err:
            return err
        try:  # `from package import submodule` imports it
            importlib.import_module(f"{path.module}.{name}")
        except ImportError:
            return ImportError(f"cannot import name {name!r} from {path.module!r} "
                               f"({getattr(module, '__file__', None) or 'no file'})")
    return None


def check_import_paths(paths: list[ImportPath], distribution: str) -> list[str]:
    """One message per statement (of one package) that no longer imports, naming the package,
    its installed version, the statement and every place that uses it."""
    sites: dict = {}
    for path in paths:
        sites.setdefault((path.module, path.names), []).append(path)
    problems = []
    for same in sites.values():
        err = _import_error(same[0])
        if err is not None:
            used = ", ".join(f"{p.file}:{p.line}" for p in same)
            problems.append(f"{distribution} {_version(distribution)} broke `{same[0].statement}` "
                            f"(used in {used}): {type(err).__name__}: {err}")
    return problems


OUR_IMPORTS = collect_imports(ROOT)
CHECKED = {module: entry[0] for module, entry in OPTIONAL.items()} | REQUIRED


def _skip_reason(module: str) -> str:
    hint = install_hint(module) if module in OPTIONAL else f"pip install {REQUIRED[module]}"
    return f"{module} is not installed ({hint}): its import paths are not checked"


@pytest.mark.parametrize("module", sorted({p.top for p in OUR_IMPORTS} & set(CHECKED)))
def test_every_import_path_we_use_exists_in_the_installed_release(module):
    paths = [p for p in OUR_IMPORTS if p.top == module]
    if not is_installed(module):
        pytest.skip(_skip_reason(module))
    problems = check_import_paths(paths, CHECKED[module])
    assert not problems, "\n".join(problems)


def test_every_third_party_import_is_known():
    """A new third-party import must say which extra installs it (gptfast.extras.OPTIONAL) or
    be a direct dependency (REQUIRED here), so that it is checked above and named when missing."""
    stdlib = set(sys.stdlib_module_names)
    unknown = [f"{p.file}:{p.line} `{p.statement}`" for p in OUR_IMPORTS
               if p.top not in stdlib | OURS | CORE | set(CHECKED)]
    assert not unknown, ("third-party imports not in gptfast.extras.OPTIONAL (or REQUIRED in "
                         "tests/test_dependencies.py):\n" + "\n".join(unknown))


def _requirement_names(requirements) -> set:
    return {re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
            for req in requirements}


def test_the_extras_named_in_errors_are_the_ones_pyproject_defines():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for module, (distribution, extra, _) in OPTIONAL.items():
        if extra is not None:
            assert extra in extras, f"{module}: pyproject has no extra [{extra}]"
            assert distribution in _requirement_names(extras[extra]), (
                f"{module}: gptfast.extras says [{extra}] installs {distribution}; pyproject's "
                f"[{extra}] is {extras[extra]}")
    assert set(REQUIRED.values()) <= _requirement_names(project["dependencies"])


def test_the_walk_finds_imports_inside_functions_and_blocks():
    """Real sites: in a function's `with optional_import` block (pretrained.py), one at module
    level (plots.py), in a function's try block (bench/layernorm.py)."""
    statements = {(p.file, p.statement) for p in OUR_IMPORTS}
    for expected in [("gptfast/pretrained.py", "from safetensors.torch import load_file"),
                     ("gptfast/pretrained.py", "from huggingface_hub import snapshot_download"),
                     ("bench/plots.py", "from matplotlib.figure import Figure"),
                     ("bench/layernorm.py",
                      "from liger_kernel.ops.layer_norm import LigerLayerNormFunction")]:
        assert expected in statements, expected


# ------------------------------------------------------------ the checker on a fake package --

@pytest.fixture
def fake_release(tmp_path, monkeypatch):
    """An installed package "fakedep" 9.9.1 (with its dist-info) that has `present` and a
    submodule `sub`, and a source tree whose code imports names it has and names it lost."""
    site = tmp_path / "site"
    (site / "fakedep").mkdir(parents=True)
    (site / "fakedep" / "__init__.py").write_text("present = 1\n")
    (site / "fakedep" / "sub.py").write_text("value = 2\n")
    dist_info = site / "fakedep-9.9.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakedep\nVersion: 9.9.1\n")
    source = tmp_path / "src" / "pkg"
    source.mkdir(parents=True)
    (source / "mod.py").write_text(
        "import os\n"
        "from . import sibling\n"
        "def load():\n"
        "    from fakedep import present, sub\n"
        "    try:\n"
        "        from fakedep import present, gone\n"
        "    except ImportError:\n"
        "        pass\n"
        "    import fakedep.removed\n"
        "    from fakedep.sub import value\n")
    monkeypatch.syspath_prepend(str(site))
    for name in [m for m in sys.modules if m == "fakedep" or m.startswith("fakedep.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path / "src"


def test_the_checker_names_package_version_statement_and_site(fake_release):
    paths = collect_imports(fake_release, ["pkg"])
    assert [(p.statement, p.line) for p in paths] == [
        ("import os", 1), ("from fakedep import present, sub", 4),
        ("from fakedep import present, gone", 6), ("import fakedep.removed", 9),
        ("from fakedep.sub import value", 10)]  # the relative import is ours, not collected
    problems = check_import_paths([p for p in paths if p.top == "fakedep"], "fakedep")
    assert problems == [
        "fakedep 9.9.1 broke `from fakedep import present, gone` (used in pkg/mod.py:6): "
        f"ImportError: cannot import name 'gone' from 'fakedep' "
        f"({fake_release.parent / 'site' / 'fakedep' / '__init__.py'})",
        "fakedep 9.9.1 broke `import fakedep.removed` (used in pkg/mod.py:9): "
        "ModuleNotFoundError: No module named 'fakedep.removed'"]


def test_the_checker_passes_a_release_that_has_every_name(fake_release):
    paths = collect_imports(fake_release, ["pkg"])
    fine = [p for p in paths if p.top == "fakedep" and p.line in (4, 10)]
    assert check_import_paths(fine, "fakedep") == []


def test_a_package_that_fails_to_import_at_all_is_named(fake_release, monkeypatch):
    """As transformers did when our kernels/ hid Hugging Face's kernels package."""
    (fake_release.parent / "site" / "fakedep" / "__init__.py").write_text(
        "from os import CUDAProperties\n")
    paths = [p for p in collect_imports(fake_release, ["pkg"]) if p.line == 4]
    (problem,) = check_import_paths(paths, "fakedep")
    assert problem.startswith("fakedep 9.9.1 broke `from fakedep import present, sub` "
                              "(used in pkg/mod.py:4): ImportError: cannot import name "
                              "'CUDAProperties' from 'os'")


def test_a_lazy_attribute_that_fails_to_import_is_named(fake_release):
    """transformers resolves `from transformers import X` through a module __getattr__."""
    (fake_release.parent / "site" / "fakedep" / "__init__.py").write_text(
        "present = 1\n"
        "def __getattr__(name):\n"
        "    raise ImportError(f'lazy {name} failed')\n")
    paths = [p for p in collect_imports(fake_release, ["pkg"]) if p.line == 6]
    assert check_import_paths(paths, "fakedep") == [
        "fakedep 9.9.1 broke `from fakedep import present, gone` (used in pkg/mod.py:6): "
        "ImportError: lazy gone failed"]
