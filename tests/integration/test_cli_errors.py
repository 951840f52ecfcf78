"""Every verb answers a missing topology, an unreachable broker or an unreachable Rucio with ONE line on
stderr (what, where, what to do), a documented exit code, and never a password (issue 11, CLI errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from injector import exits
from injector.testbed.rucio import free_port

pytestmark = pytest.mark.integration

SECRET = "s3cret-pw"


def config(tmp_path: Path, port: int = 5672, user: str = "guest", password: str = "guest") -> Path:
    """A config whose exchanges and queues were never declared (unique names)."""
    tag = uuid.uuid4().hex[:8]
    path = tmp_path / f"c-{tag}.toml"
    path.write_text(
        f'[broker]\nurls = ["amqp://{user}:{password}@127.0.0.1:{port}//"]\ndaq_exchange = "t-{tag}.daq"\n'
        f'dead_letter_exchange = "t-{tag}.dlx"\nconnect_attempts = 1\n[ingest]\nqueue = "t-{tag}.ingest"\n'
        f'[cleanup]\nqueue = "t-{tag}.cleanup"\nhermes_destination = "/topic/t-{tag}.events"\n'
        f'[metrics]\ningest_port = 0\ncleanup_port = 0\n[outbox]\npath = "{tmp_path}/outbox.sqlite"\n')
    return path


def run(cfg: Path, *args: str, rucio: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
    if rucio is not None:
        env["RUCIO_CONFIG"] = rucio
    return subprocess.run([sys.executable, "-m", "injector.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line(out: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = out.stderr.splitlines()
    assert out.returncode == code and len(lines) == 1, f"exit {out.returncode}, stderr:\n{out.stderr}"
    assert lines[0].startswith("rucio-injector "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    assert SECRET not in out.stderr + out.stdout and "Traceback" not in out.stderr
    return lines[0]


def unreachable_rucio(tmp_path: Path) -> str:
    path = tmp_path / "rucio.cfg"
    path.write_text(f"[client]\nrucio_host = http://127.0.0.1:{free_port()}\nauth_host = http://127.0.0.1:"
                    f"{free_port()}\nauth_type = userpass\nusername = root\npassword = {SECRET}\naccount = root\n"
                    f"auth_token_file_path = {tmp_path}/token\nrequest_retries = 1\n")
    return str(path)


ONE_SHOT = [("publish", "/etc/hostname", "--site", "ORM", "--instrument", "LST1"), ("dlq", "list"),
            ("dlq", "replay"), ("dlq", "purge", "--yes"), ("dlq", "export", "-"), ("dlq", "show", "abc"),
            ("dlq", "migrate")]


@pytest.mark.parametrize("args", ONE_SHOT + [("ingest",), ("cleanup",)], ids=" ".join)
def test_before_broker_setup_a_verb_says_in_one_line_which_queue_or_exchange_is_missing(tmp_path, args):
    line = one_line(run(config(tmp_path), *args), exits.BROKER, "not exist on amqp://127.0.0.1:5672//",
                    "run `rucio-injector broker setup`")
    assert "guest" not in line


@pytest.mark.parametrize("verb", ["status", "reconcile"])
def test_verbs_reading_rucio_also_say_which_topology_is_missing(tmp_path, rucio_server, verb):
    """status still shows Rucio's side (stdout), then names the missing queues; reconcile stops before."""
    out = run(config(tmp_path), verb, rucio=str(rucio_server.client_config))
    one_line(out, exits.BROKER, "not exist on amqp://127.0.0.1:5672//", "broker setup")


@pytest.mark.parametrize("args", ONE_SHOT + [("broker", "setup")], ids=" ".join)
def test_an_unreachable_broker_is_one_line_naming_it_without_user_or_password(tmp_path, args):
    cfg = config(tmp_path, port=free_port(), user="admin", password=SECRET)
    line = one_line(run(cfg, *args), exits.BROKER, "unreachable", "127.0.0.1")
    assert "admin" not in line


@pytest.mark.parametrize("verb", ["status", "reconcile"])
def test_an_unreachable_rucio_is_one_line_and_exit_4(tmp_path, verb):
    one_line(run(config(tmp_path), verb, rucio=unreachable_rucio(tmp_path)), exits.RUCIO, "Rucio unreachable",
             "RUCIO_CONFIG")


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path):
    one_line(run(tmp_path / "nope.toml", "dlq", "list"), exits.BAD_CONFIG, "does not exist")


def test_ingest_waits_for_an_unreachable_broker_logging_one_line_per_attempt_without_credentials(
        tmp_path, rucio_server):
    cfg = config(tmp_path, port=free_port(), user="admin", password=SECRET)
    proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "ingest"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)})
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline().rstrip("\n") for _ in range(2)]  # two attempts, waiting between them
        assert proc.poll() is None, "ingest waits for the broker instead of exiting"
        proc.send_signal(signal.SIGTERM)  # waiting for the broker, it stops at once, cleanly
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, "\n".join(lines) + rest
    assert all(" WARNING " in line and "unreachable" in line for line in lines), lines
    assert SECRET not in "".join(lines) and "admin" not in "".join(lines)


def test_help_lists_the_exit_codes():
    out = subprocess.run([sys.executable, "-m", "injector.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for code, _ in exits.TABLE:
        assert f"\n  {code:<4} " in out.stdout, out.stdout


