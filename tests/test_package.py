"""Packaging: the wheel's layout, and that building it needs neither torch nor a GPU."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("pybind11", reason="building the wheel offline needs pybind11 (in [test])")
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would leave a CPU-only build/ that a later
    # `pip install .` in the checkout reuses instead of compiling the CUDA part.
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", "bench-results"))
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
    assert any(n.startswith("gptfast/_C") and n.endswith(".so") for n in names)
    top_level = {n.split("/")[0] for n in names}
    assert all(name == "gptfast" or name.endswith(".dist-info") for name in top_level), top_level
    assert not any(n.startswith(("kernels/", "bench/", "tests/", "csrc/")) for n in names)


def test_wheel_metadata_names_distribution_script_and_extras(wheel):
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    assert "Name: gptfast-kernels" in metadata
    for extra in ("test", "bench", "hf"):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt")))
    assert b"gptfast = gptfast.cli:main" in entry_points
