"""A production install, for real: the project pip-installed without extras into a throw-away venv (needs the
package index, ~15 s with a warm pip cache) runs its CLI and has no pamqp. The fast, in-venv checks of the same
promise: tests/unit/test_core_imports.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def shipped_copy(dest: Path) -> Path:
    """What a wheel is built from, copied: the build's own build/ directory must not land in the work tree."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    for top in sorted({p.partition(".")[0] for p in packages}):
        shutil.copytree(ROOT / top, dest / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def run(*argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd="/")


def test_an_install_without_extras_runs_the_cli_without_pamqp_and_the_demo_says_what_it_needs(tmp_path):
    source = shipped_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = run(venv / "bin/pip", "install", "-q", "--disable-pip-version-check", source, timeout=240)
    assert installed.returncode == 0, installed.stderr

    helped = run(venv / "bin/rucio-injector", "--help")
    assert helped.returncode == 0 and "demo" in helped.stdout, helped.stderr
    imported = run(venv / "bin/python", "-c", "import pamqp")
    assert "No module named 'pamqp'" in imported.stderr, (imported.returncode, imported.stderr)
    demo = run(venv / "bin/rucio-injector", "demo")
    assert (demo.returncode, demo.stderr) == (2, "rucio-injector demo: the demo needs pamqp, which is not "
                                                 "installed: pip install 'rucio-injector[demo]'\n")
