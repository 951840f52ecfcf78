"""The long-running verbs as operators start them: a process, a TOML file, /metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from injector.config import Settings
from injector.testbed.rucio import free_port
from tests.integration.conftest import Lab
from tests.integration.hermes import HermesSender
from tests.integration.rabbit import declared, wait_for
from tests.integration.test_cleanup_rucio import RABBIT_STOMP, cleanup_settings
from tests.integration.test_ingest_rucio import stream_toml

pytestmark = pytest.mark.integration


def cleanup_toml(s: Settings, lab: Lab, path: Path) -> Path:
    b, c = s.broker, s.cleanup
    path.write_text(
        f'[broker]\nurls = ["{b.urls[0]}"]\ndaq_exchange = "{b.daq_exchange}"\n'
        f'dead_letter_exchange = "{b.dead_letter_exchange}"\n'
        f'[ingest]\nqueue = "{s.ingest.queue}"\n'
        f'[cleanup]\nflavour = "{c.flavour}"\nstomp_hosts = ["{c.stomp_hosts[0]}"]\n'
        f'hermes_destination = "{c.hermes_destination}"\nqueue = "{c.queue}"\nbatch_window = 0.1\n'
        + stream_toml(lab))
    return path


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_cleanup_verb_consumes_hermes_events_serves_metrics_and_stops_cleanly_on_sigterm(lab, tmp_path):
    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))
    port = free_port()
    with declared(s):
        env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cleanup_toml(s, lab, tmp_path / "injector.toml"))}
        proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "cleanup", "--metrics-port", str(port)],
                                env=env, stderr=subprocess.PIPE, text=True)
        try:
            def healthy() -> bool:
                try:
                    return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
                except OSError:
                    return False

            wait_for(healthy, timeout=30, what="/healthz 200")
            # a managed scope (Rucio is asked, knows no such file) and another experiment's scope
            with HermesSender(s) as hermes:
                hermes.send("transfer-done", {"scope": "lst", "name": f"/nowhere/{lab.tag}", "dst-rse": "X"})
                hermes.send("deletion-done", {"scope": "atlas", "name": "a.root", "rse": "CERN"})
            wait_for(lambda: metric(port, "rucio_injector_events_total", 'outcome="unmanaged"') == 2, timeout=30,
                     what="2 unmanaged events in /metrics")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in err and "unmanaged" in err
