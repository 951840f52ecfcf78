"""The README's first command, small: the whole pipeline on its own throw-away Rucio server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_archives_every_file_and_proves_it():
    done = subprocess.run([sys.executable, "-m", "injector.cli", "demo", "--files", "3", "--size", "4096",
                           "--timeout", "150"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "proof: buffer holds 0 file(s); archive holds 6/6 files with the DAQ's adler32" in out, out[-4000:]
    assert "rucio replica list file --all-states" in out
    leftovers = subprocess.run(["pgrep", "-f", "rucio-injector-demo-"], capture_output=True, text=True)
    assert not leftovers.stdout.strip(), "the demo left processes running"
