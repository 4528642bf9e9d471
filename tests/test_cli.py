"""The gptfast command: info in text and JSON, python -m gptfast, usage errors."""

import base64
import importlib
import json
import subprocess
import sys

import pytest

from gptfast import cli


def test_info_reports_versions_extension_and_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("torch", "triton", "device", "extension", "gptfast._C", *cli.OPS):
        assert expected in out
    assert "reference (no CUDA device" in out or "triton" in out


def test_info_json_is_machine_readable(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["ops"]) == set(cli.OPS)
    assert info["extension"]["present"] is True, "the compiled extension should be installed"
    assert info["cuda_available"] is False or info["device"] != "cpu"


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "gptfast", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "what 'auto' runs on this device" in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: gptfast" in capsys.readouterr().out


def test_extension_build_info_is_consistent():
    from gptfast import _C

    info = _C.build_info()
    assert isinstance(info["cuda"], bool)
    assert hasattr(_C, "cuda_device_count") == info["cuda"]
    if info["cuda"]:
        assert info["cuda_runtime_version"] >= 11000
        assert _C.cuda_device_count() >= 0


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(tmp_path, uninstall, capsys):
    """A Hugging Face directory with model.safetensors and no safetensors installed."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_positions": 16, "vocab_size": 256, "n_layer": 1, "n_head": 2,
         "n_embd": 32}))
    (hf / "model.safetensors").write_bytes(b"")
    ranks = tmp_path / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    uninstall("safetensors")  # as if not installed
    assert cli.main(["sample", "--ckpt", str(hf), "--tokenizer-file", str(ranks),
                     "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("gptfast sample: error: ") and "needs safetensors" in err
    assert 'pip install "gptfast-kernels[hf]"' in err


def test_optional_import_converts_only_a_missing_package(uninstall):
    from gptfast.extras import MissingExtra, optional_import

    uninstall("matplotlib")
    with pytest.raises(MissingExtra, match=r'plots needs matplotlib, .*\[bench\]"$'):
        with optional_import("matplotlib", "plots"):
            from matplotlib.figure import Figure  # noqa: F401
    with pytest.raises(ImportError) as caught:  # a name gone from an installed package
        with optional_import("pytest", "tests"):
            from pytest import no_such_name  # noqa: F401
    assert not isinstance(caught.value, MissingExtra)
    with pytest.raises(ModuleNotFoundError) as caught:  # a submodule gone from it
        with optional_import("pytest", "tests"):
            importlib.import_module("pytest.no_such_module")
    assert not isinstance(caught.value, MissingExtra)
    with pytest.raises(ValueError, match="not an optional dependency"):
        with optional_import("numpy", "arrays"):
            pass


def test_info_lists_optional_dependencies_and_the_extra_for_each_missing_one(monkeypatch, capsys):
    from gptfast import extras

    assert cli.main(["info", "--json"]) == 0
    optional = json.loads(capsys.readouterr().out)["optional"]
    assert set(optional) == set(extras.OPTIONAL)
    assert optional["pytest"]["version"] == pytest.__version__  # what runs this test
    versions = {**extras.installed_versions(), "matplotlib": None}
    monkeypatch.setattr(extras, "installed_versions", lambda: versions)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("matplotlib")]
    assert 'not installed (pip install "gptfast-kernels[bench]")' in line and "plots" in line
