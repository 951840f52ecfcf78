"""The README's first command, small: the whole pipeline on its own throw-away Rucio server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


LEFTOVERS = ("rucio-injector-demo-", "injector.testbed.broker")


def running(pattern: str) -> set[str]:
    return set(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split())


def demo(*args: str) -> str:
    before = {p: running(p) for p in LEFTOVERS}  # this test session's own embedded broker is no leftover
    done = subprocess.run([sys.executable, "-m", "injector.cli", "demo", "--files", "3", "--size", "4096",
                           "--timeout", "150", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "proof: buffer holds 0 file(s); archive holds 6/6 files with the DAQ's adler32" in out, out[-4000:]
    assert "rucio replica list file --all-states" in out
    for pattern in LEFTOVERS:
        left = running(pattern) - before[pattern]
        assert not left, f"the demo left processes running: {pattern} (pids {sorted(left)})"
    return out


def test_demo_archives_every_file_and_proves_it():
    out = demo()
    assert "broker: RabbitMQ, AMQP amqp://127.0.0.1:5672//" in out and "guest:guest" not in out


def test_on_a_machine_with_only_python_the_demo_runs_on_the_embedded_broker_and_sqlite():
    # Nothing answers on port 1: to the demo, this machine has no RabbitMQ STOMP plugin.
    out = demo("--stomp-port", "1", "--database", "sqlite")
    assert "(SQLite /" in out
    assert "RabbitMQ's STOMP plugin (for hermes; enable it: rabbitmq-plugins enable rabbitmq_stomp) is not " \
           "reachable on 127.0.0.1:1" in out, out[-4000:]
    assert "using the embedded broker instead" in out and "broker: embedded (in memory)" in out
