"""The Makefile installs what each target needs: labeling gets the core dependencies only; tests, lint and
benchmarks add the dev tools and Ray. Read from `make -n` against a throwaway venv path, so nothing is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

LABELING = [["demo"], ["compare-demo"], ["label", "INPUT=in.csv"], ["simulate"], ["docs"]]
DEVELOPING = [["install"], ["test"], ["test-fast"], ["lint"], ["fmt"], ["bench"], ["bench-quick"], ["test-compat"]]


def planned_installs(venv: Path, *target: str) -> list[str]:
    """What `pip install -e` would be given by `make TARGET` with the venv at `venv` (its package specs)."""
    plan = subprocess.run(
        ["make", "-n", *target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return [m.group(1).strip("'\"") for m in re.finditer(r"pip install .*?-e (\S+)", plan.stdout)]


@pytest.mark.parametrize("target", LABELING, ids=lambda t: t[0])
def test_labeling_targets_install_the_package_without_dev_tools_or_ray(tmp_path: Path, target: list[str]) -> None:
    """`make demo`, `make label`, `make simulate` (and compare-demo, docs) on a fresh machine install no extras."""
    assert planned_installs(tmp_path / "venv", *target) == ["."]


@pytest.mark.parametrize("target", DEVELOPING, ids=lambda t: t[0])
def test_developer_targets_install_the_dev_tools_and_ray(tmp_path: Path, target: list[str]) -> None:
    """`make test` (CI), `make test-fast`, `make lint`, `make bench` and the rest install the dev and ray extras."""
    assert planned_installs(tmp_path / "venv", *target) == [".[dev,ray]"]


@pytest.mark.parametrize(("target", "stamp"), [(["demo"], ".installed-run"), (["lint"], ".installed-dev")])
def test_an_install_is_redone_when_pyproject_changes(tmp_path: Path, target: list[str], stamp: str) -> None:
    """A stamp newer than pyproject.toml skips the install; one older than it (the deps changed) redoes it."""
    venv = tmp_path / "venv"
    venv.mkdir()
    marker = venv / stamp
    marker.touch()
    edited = (ROOT / "pyproject.toml").stat().st_mtime
    os.utime(marker, (edited + 60, edited + 60))
    assert planned_installs(venv, *target) == []
    os.utime(marker, (edited - 60, edited - 60))
    assert len(planned_installs(venv, *target)) == 1
