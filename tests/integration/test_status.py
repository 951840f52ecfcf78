"""`status` on the real services: the announcing stage read from Rucio, ActiveMQ's cleanup queue and its DLQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import stomp

from consumers.cleanup import release
from injector.config import Settings
from injector.gateway import ClientGateway
from injector.testbed.rucio import free_port
from operations import status
from operations.dlq import ActiveMqDlq
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import declared, ingested, unique_settings
from tests.integration.test_ingest_rucio import files
from tests.integration.test_reconcile_rucio import TRANSFER, cli, config_file, json_marks, settings_for, sweep

pytestmark = pytest.mark.integration


def test_an_archived_file_not_yet_announced_is_announcing_and_an_announced_one_is_archived(lab: Lab,
                                                                                          tmp_path: Path) -> None:
    s = settings_for(lab)
    (announced,), (pending,) = files(lab, 1, night="20261126"), files(lab, 1, night="20261127")
    with declared(s):
        ingested(s, [announced, pending])
        lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])  # no cleanup consumer: its events are lost
        release(ClientGateway(s.rucio), [("lst", announced.path, SOURCE)])
        lab.server.run_daemons("reaper", rses=[SOURCE])
        # The reconciler announces the first file (its deletion-done was lost) and releases the second, whose
        # source the reaper then deletes: archived, but its file-archived is not sent yet.
        assert {(f.kind, f.action) for f in sweep(s, grace=timedelta(0))} == {("announce-archived", "done"),
                                                                             ("release-source", "done")}
        lab.server.run_daemons("reaper", rses=[SOURCE])
        data = status.collect(s, ClientGateway(s.rucio))
        table = cli(config_file(s, tmp_path / "injector.toml"), "status")
    marks = json_marks(lab, [announced.path, pending.path])
    assert marks[announced.path].get("injector_announced") and not marks[pending.path].get("injector_announced")
    assert all(r["states"] == {ARCHIVE: "AVAILABLE"} for r in lab.replicas([announced.path, pending.path]).values())
    shown = data["streams"]["lst1-raw"]
    zero = dict.fromkeys(status.STAGES, 0)
    assert shown == {f"lst:LST1_{lab.tag}_20261126_raw": {**zero, "registered": 1, "archived": 1},
                     f"lst:LST1_{lab.tag}_20261127_raw": {**zero, "registered": 1, "announcing": 1}}
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "registered" in line)
    assert header.index("released") < header.index("announcing") < header.index("archived")


def activemq_settings(port: int) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return unique_settings({"streams": []}, cleanup={
        "flavour": "activemq", "stomp_hosts": [f"127.0.0.1:{port}"], "app": f"app-{tag}",
        "hermes_destination": f"/topic/VirtualTopic.t-{tag}"})


def activemq_queues(s: Settings) -> tuple[str, str]:
    """The cleanup consumers' queue and its DLQ, as ActiveMQ names them."""
    return f"Consumer.{s.cleanup.app}.{s.cleanup.topic}", f"DLQ.Consumer.{s.cleanup.app}.{s.cleanup.topic}"


def send(s: Settings, queue: str, n: int) -> None:
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    conn = stomp.Connection12([(host, int(port))])
    conn.connect("guest", "guest", wait=True)
    for i in range(n):
        conn.send(f"/queue/{queue}", f'{{"n": {i}}}', headers={"persistent": "true"}, receipt=uuid.uuid4().hex)
    conn.disconnect()


def status_cli(s: Settings, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    c = s.cleanup
    path.write_text(f'[broker]\nurls = ["{s.broker.urls[0]}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
                    f'dead_letter_exchange = "{s.broker.dead_letter_exchange}"\n[ingest]\nqueue = "{s.ingest.queue}"\n'
                    f'[cleanup]\nflavour = "activemq"\nstomp_hosts = ["{c.stomp_hosts[0]}"]\napp = "{c.app}"\n'
                    f'hermes_destination = "{c.hermes_destination}"\n')
    return subprocess.run([sys.executable, "-m", "injector.cli", "status", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RUCIO_INJECTOR_CONFIG": str(path), "COLUMNS": "200"})


def test_status_with_activemq_shows_the_cleanup_queue_and_its_dlq_with_their_depths(activemq: Any,
                                                                                    tmp_path: Path) -> None:
    s = activemq_settings(activemq.stomp_port)
    work, dlq = activemq_queues(s)
    send(s, work, 2)
    send(s, dlq, 3)
    try:
        with declared(s):
            data = status.collect(s, ClientGateway(s.rucio))
            table = status_cli(s, tmp_path / "injector.toml")
            again = status_cli(s, tmp_path / "injector.toml", "--json")
        assert data["activemq_queues"] == {work: {"messages": 2}, dlq: {"messages": 3}}
        assert table.returncode == 0, table.stderr
        rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.stdout.splitlines()
                if line.count("│") == 3}
        assert (rows[work], rows[dlq]) == ("2", "3"), table.stdout
        assert json.loads(again.stdout)["activemq_queues"] == data["activemq_queues"], "browsing consumed nothing"
    finally:
        for q in (work, dlq):
            ActiveMqDlq(s.cleanup.server).purge(q)


def test_status_with_activemq_unreachable_says_so_in_one_line_and_shows_the_rest(tmp_path: Path) -> None:
    s = activemq_settings(free_port())  # nothing listens there
    with declared(s):
        data = status.collect(s, ClientGateway(s.rucio))
        table = status_cli(s, tmp_path / "injector.toml")
    error = data["activemq_queues"]["error"]
    assert error.startswith("ActiveMQ unreachable: cannot connect to STOMP") and "ConnectFailedException" in error
    assert s.cleanup.stomp_hosts[0] in error
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    lines = [line for line in table.stdout.splitlines() if "unreachable" in line]
    assert len(lines) == 1 and "ActiveMQ unreachable" in lines[0], table.stdout
    assert s.ingest.queue in table.stdout, "the RabbitMQ queues are still shown"
