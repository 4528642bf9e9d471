"""Packaging: what the sdist holds, the wheel's layout, and that building needs neither torch nor a GPU."""

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_TREE_OUTPUTS = (".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
                    "bench-results")

# Build outputs and dev files a checkout may hold, planted in the copy the sdist is built from:
# none of them may reach the sdist.
STRAYS = ["build/lib/gptfast/_C.cpython-311-x86_64-linux-gnu.so", "gptfast/_C.stray.so",
          "csrc/module.o", "gptfast/__pycache__/cli.cpython-311.pyc",
          "bench-results/20260101-000000/results.jsonl", "dist/old.whl"]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77", reason="license-files needs setuptools >= 77")
    work = tmp_path_factory.mktemp("sdist")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*DEV_TREE_OUTPUTS))
    for stray in STRAYS:
        (source / stray).parent.mkdir(parents=True, exist_ok=True)
        (source / stray).write_bytes(b"stray")
    # setuptools' PEP 517 hook itself: offline, and what `python -m build --sdist` calls.
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "print(build_meta.build_sdist(sys.argv[1]))", str(work / "dist")],
        cwd=source, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = (work / "dist").glob("gptfast_kernels-*.tar.gz")
    with tarfile.open(built) as archive:
        top = "gptfast_kernels-0.1.0/"
        return {n[len(top):] for n in archive.getnames() if n.startswith(top)}


def test_sdist_holds_what_the_build_needs(sdist):
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in",
                 "gptfast/__init__.py", "kernels/__init__.py", "bench/__init__.py",
                 "tests/conftest.py"):
        assert name in sdist, name
    for source in (ROOT / "csrc").iterdir():
        if source.suffix in (".h", ".cpp", ".cu"):
            assert f"csrc/{source.name}" in sdist, source.name
    assert any(n.startswith("csrc/") and n.endswith(".cu") for n in sdist)
    assert {f"bench/{p.name}" for p in (ROOT / "bench").glob("*.md")} <= sdist


def test_sdist_leaves_out_build_outputs_and_ci(sdist):
    for stray in STRAYS:
        assert stray not in sdist, stray
    assert not any(n.endswith((".so", ".o", ".pyc", ".whl")) for n in sdist), sorted(sdist)
    assert not any(n.startswith((".ci/", ".git", "build/", "bench-results/")) for n in sdist)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("pybind11", reason="building the wheel offline needs pybind11 (in [test])")
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would leave a CPU-only build/ that a later
    # `pip install .` in the checkout reuses instead of compiling the CUDA part.
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*DEV_TREE_OUTPUTS))
    # A torch that refuses to import: the build must never need it.
    fake = work / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the gptfast build imported torch')\n")
    env = {"PYTHONPATH": str(fake.parent), "GPTFAST_NO_CUDA": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(work)}
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = (work / "dist").glob("gptfast_kernels-*.whl")
    return built


def test_wheel_maps_kernels_and_bench_into_gptfast(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "gptfast/kernels/__init__.py" in names
    assert "gptfast/bench/__init__.py" in names
    assert "gptfast/bench/headline/__main__.py" in names  # python -m gptfast.bench.headline
    assert any(n.startswith("gptfast/_C") and n.endswith(".so") for n in names)
    top_level = {n.split("/")[0] for n in names}
    assert all(name == "gptfast" or name.endswith(".dist-info") for name in top_level), top_level
    assert not any(n.startswith(("kernels/", "bench/", "tests/", "csrc/")) for n in names)
    # every module, subpackages included (setup.py names each package: a new one must be added)
    for folder, package in (("gptfast", "gptfast"), ("kernels", "gptfast/kernels"),
                            ("bench", "gptfast/bench")):
        modules = {f"{package}/{p.relative_to(ROOT / folder).as_posix()}"
                   for p in (ROOT / folder).rglob("*.py")}
        assert modules <= set(names), sorted(modules - set(names))
    # bench's Markdown (the figures it compares against) installs with gptfast.bench
    assert {f"gptfast/bench/{p.name}" for p in (ROOT / "bench").glob("*.md")} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_wheel_metadata_names_distribution_script_and_extras(wheel):
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    assert "Name: gptfast-kernels" in metadata
    for extra in ("test", "bench", "hf"):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt")))
    assert b"gptfast = gptfast.cli:main" in entry_points
