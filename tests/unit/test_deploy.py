"""deploy/systemd: every unit passes `systemd-analyze verify`, runs a verb our command line takes with the config
of its instance, stops with SIGTERM (which that verb handles), and never restarts on a bad configuration."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from injector import exits
from injector.cli import STOPPABLE, build_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
INSTALLED = "/opt/rucio-injector/bin/rucio-injector"


def service(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser["Service"]


def test_there_is_a_unit_for_each_long_running_verb():
    assert [u.name for u in UNITS] == [f"rucio-injector-{v}@.service" for v in ("cleanup", "ingest", "reconcile",
                                                                                 "watch")]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_finds_nothing(unit: Path, tmp_path: Path):
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze (Debian package systemd) is needed to check the units"
    here = Path(sys.executable).parent / "rucio-injector"  # the installed command, where this test runs
    (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(here)))
    instance = tmp_path / unit.name.replace("@.", "@lapalma.")
    done = subprocess.run([verify, "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_runs_its_verb_with_its_instances_config_and_stops_it_cleanly(unit: Path):
    s = service(unit)
    command = shlex.split(s["ExecStart"])
    assert command[0] == INSTALLED
    args = build_parser().parse_args(command[1:])
    verb = unit.name.removeprefix("rucio-injector-").removesuffix("@.service")
    assert args.verb == verb and args.config == "/etc/rucio-injector/%i.toml"
    assert verb in STOPPABLE and s["KillSignal"] == "SIGTERM", "SIGTERM finishes the batch and exits 0"
    assert s["RestartPreventExitStatus"] == str(exits.BAD_CONFIG), "a bad config is not retried forever"
    assert s["Restart"] == "on-failure" and s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    if verb == "reconcile":
        assert args.every == 600
