"""The gptfast command: info in text and JSON, python -m gptfast, usage errors."""

import json
import subprocess
import sys

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
