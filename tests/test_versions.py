"""README's "Supported versions" table, pyproject's floors and CI's pins say the same thing,
and the versions this test runs under (each CI leg) are listed in the table."""

import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def minor(version: str) -> tuple[int, int]:
    major, minor_ = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor_)


def readme_rows():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Supported versions"):]
    section = section[:section.index("\n#")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.match(r"\d", cells[1]):
            rows.append(dict(leg=cells[0], python=cells[1], torch=cells[2], triton=cells[3],
                             numpy=cells[4]))
    assert rows, "README's Supported versions table has no rows"
    return rows


def compat_pins():
    pins = {}
    for line in (ROOT / ".ci" / "compat.env").read_text().splitlines():
        match = re.match(r'(COMPAT_\w+)="?([^"]*)"?$', line.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def test_the_compat_row_is_what_ci_pins():
    pins = compat_pins()
    compat = [row for row in readme_rows() if row["leg"].startswith("compat")]
    assert len(compat) == 1
    row = compat[0]
    assert minor(row["python"]) == minor(pins["COMPAT_PYTHON"])
    assert minor(row["torch"]) == minor(pins["COMPAT_TORCH"])
    assert minor(row["triton"]) == minor(pins["COMPAT_TRITON"])
    assert row["numpy"].replace(" ", "") == pins["COMPAT_NUMPY"]


def test_pyproject_floors_are_the_oldest_versions_in_the_table():
    text = (ROOT / "pyproject.toml").read_text()
    rows = readme_rows()
    python_floor = re.search(r'requires-python = ">=([\d.]+)"', text).group(1)
    torch_floor = re.search(r'"torch>=([\d.]+)"', text).group(1)
    triton_floor = re.search(r'"triton>=([\d.]+)', text).group(1)
    assert minor(python_floor) == min(minor(r["python"]) for r in rows)
    assert minor(torch_floor) == min(minor(r["torch"]) for r in rows)
    assert minor(triton_floor) == min(minor(r["triton"]) for r in rows)


def test_the_ci_leg_runs_the_versions_its_row_lists():
    """Under .ci/run (which sets GPTFAST_CI_LEG), the leg's row must be what it runs: when pip
    starts giving newer versions to the main leg, this fails until the table says so."""
    leg = os.environ.get("GPTFAST_CI_LEG")
    if not leg:
        pytest.skip("not under .ci/run (GPTFAST_CI_LEG unset)")
    triton = pytest.importorskip("triton")
    rows = [r for r in readme_rows() if r["leg"].split()[0] == leg]
    assert len(rows) == 1, f"README's table has no single row for the CI leg {leg!r}"
    row = rows[0]
    assert minor(row["python"]) == sys.version_info[:2]
    assert minor(row["torch"]) == minor(torch.__version__)
    assert minor(row["triton"]) == minor(triton.__version__)
