"""The checkout's top-level ``kernels/`` folder must never hide Hugging Face's ``kernels``.

``python -m pytest``, ``python -c`` and scripts in the repository root put the root on
``sys.path``, so ``import kernels`` (which transformers does) used to load our Triton kernels.
Each case runs a fresh interpreter whose working directory is the repository root.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code, extra_path=None, *flags):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_kernels_package_elsewhere_on_the_path_wins_over_the_checkout(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("MARKER = 'the other kernels'\n")
    (other / "layers.py").write_text("NAME = 'layers'\n")
    out = run_from_root("import sys; print(sys.path[0] == '');"
                        "import kernels, kernels.layers; print(kernels.MARKER, kernels.layers.NAME)",
                        extra_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "the", "other", "kernels", "layers"]


def test_without_another_kernels_the_bare_import_fails_as_outside_the_checkout():
    # -S: no site-packages, so no Hugging Face kernels, only the root ('') and the stdlib
    out = run_from_root("import kernels", None, "-S")
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr and "kernels" in out.stderr


def test_gptfast_kernels_still_imports_from_the_root():
    out = run_from_root("import gptfast.kernels as k, gptfast.kernels.layernorm as ln;"
                        "print(k.__name__, ln.__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gptfast.kernels", "gptfast.kernels.layernorm"]


def test_installed_hugging_face_kernels_is_the_one_imported():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    out = run_from_root("import kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).resolve().is_relative_to(ROOT)


def test_a_transformers_model_builds_and_runs_from_the_root():
    pytest.importorskip("transformers")
    out = run_from_root(
        "import torch, transformers\n"
        "config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16,"
        " vocab_size=64, bos_token_id=0, eos_token_id=0)\n"
        "model = transformers.GPT2LMHeadModel(config)\n"
        "print(tuple(model(torch.zeros(1, 4, dtype=torch.long)).logits.shape))\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "(1, 4, 64)"
