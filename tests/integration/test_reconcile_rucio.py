"""The reconciler and status on the real Rucio server + RabbitMQ: lost events are finished from
Rucio's state; what cannot be finished is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from consumers import reconcile, status
from consumers.services import ingest_worker
from injector import topology
from injector.config import Settings
from injector.events import FileClosed, decode_file_archived
from injector.gateway import ClientGateway
from injector.testbed.rses import file_protocol
from injector.transport import Publisher, connection
from producers.publish import DaqPublisher
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import declared, get_all, running, unique_settings, wait_for
from tests.integration.test_ingest_rucio import files

pytestmark = pytest.mark.integration

TRANSFER = ("judge-evaluator", "submitter", "poller", "finisher")


def settings_for(lab: Lab, **stream: Any) -> Settings:
    return unique_settings({"streams": [lab.stream(**stream)]}, ingest={"batch_window": 0.1})


def ingest(s: Settings, events: list[Any]) -> None:
    with DaqPublisher(s.broker) as daq:
        daq.publish(events)
    worker = ingest_worker(s)
    with running(worker):
        wait_for(lambda: worker.stats.messages == len(events), timeout=60, what="ingest")


def sweep(s: Settings, **options: Any) -> list[reconcile.Finding]:
    conn = connection(s.broker)
    try:
        return reconcile.sweep(s, ClientGateway(s.rucio), Publisher(conn).publish, reconcile.Options(**options))
    finally:
        conn.release()


def kinds(findings: list[reconcile.Finding]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in findings:
        out[f"{f.action} {f.kind}"] = out.get(f"{f.action} {f.kind}", 0) + 1
    return out


def test_lost_transfer_done_and_deletion_done_are_finished_by_reconcile(lab, tmp_path):
    s = settings_for(lab)
    events = files(lab, 3)
    with declared(s):
        ingest(s, events)
        lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])  # no cleanup consumer: transfer-done is lost
        assert kinds(sweep(s, dry_run=True)) == {"would release-source": 3}
        assert all(Path(e.path).exists() for e in events), "dry run changed nothing"

        cfg = tmp_path / "c.toml"
        cfg.write_text(_toml(s, lab))
        env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
        cli = subprocess.run([sys.executable, "-m", "injector.cli", "reconcile", "--json"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert sorted(f["subject"] for f in json.loads(cli.stdout) if f["kind"] == "release-source") == \
            sorted(f"lst:{e.path}" for e in events)

        lab.server.run_daemons("reaper", rses=[SOURCE])
        assert not any(Path(e.path).exists() for e in events), "the reaper deleted the released sources"
        # deletion-done is lost too: the next sweep announces the files.
        assert kinds(sweep(s)) == {"done announce-archived": 3}
        assert kinds(sweep(s)) == {}, "announced once"
        archived = [decode_file_archived(m.body) for m in get_all(s, topology.archived_queue(s))]
    assert sorted(a.name for a in archived) == sorted(e.path for e in events)
    assert all(a.destinations == [ARCHIVE] for a in archived)


def _toml(s: Settings, lab: Lab) -> str:
    st = s.streams[0]
    return (f'[broker]\nurls = ["{s.broker.urls[0]}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
            f'dead_letter_exchange = "{s.broker.dead_letter_exchange}"\n[ingest]\nqueue = "{s.ingest.queue}"\n'
            f'[metrics]\nreconcile_port = 0\n[[streams]]\nname = "{st.name}"\nsite = "ORM"\ninstrument = "LST1"\n'
            f'source_rse = "{st.source_rse}"\nstorage_root = "{st.storage_root}"\nscope = "lst"\n'
            f'dataset = "{st.dataset}"\nrules = [{{ rse_expression = "{ARCHIVE}", copies = 1 }}]\n')


def _own_source(lab: Lab, name: str) -> Path:
    """A source RSE of this test only (its settings are changed)."""
    root = lab.client.source_dir.parent / name.lower()
    root.mkdir()
    lab.client.add_rse(name, deterministic=False)
    lab.client.add_protocol(name, file_protocol(root))
    lab.client.set_local_account_limit("root", name, -1)
    lab.client.add_distance(name, ARCHIVE, {"distance": 1})
    return root


@pytest.mark.parametrize("breakage", ["availability_delete", "empty_hostname"])
def test_a_released_source_the_reaper_cannot_delete_is_diagnosed(lab, breakage):
    rse = f"BROKEN-{lab.tag.upper()}"
    root = _own_source(lab, rse)
    s = settings_for(lab, source_rse=rse, storage_root=str(root))
    lab.root = root
    events = files(lab, 2)
    with declared(s):
        ingest(s, events)
        lab.server.run_daemons(*TRANSFER, rses=[rse, ARCHIVE])
        assert kinds(sweep(s)) == {"done release-source": 2}
        if breakage == "availability_delete":
            lab.client.update_rse(rse, {"availability_delete": False})
        else:
            lab.client.delete_protocols(rse, "file")
            lab.client.add_protocol(rse, file_protocol(root, hostname=""))
        lab.server.run_daemons("reaper", rses=[rse])
        assert all(Path(e.path).exists() for e in events)
        found = sweep(s, grace=timedelta(0))
    stuck = [f for f in found if f.kind == "source-not-deleted"]
    assert len(stuck) == 2, found
    cause = "availability_delete false" if breakage == "availability_delete" else "empty hostname"
    assert all(cause in f.detail for f in stuck), stuck[0].detail


def test_rule_with_negative_remaining_lifetime_is_reported_with_its_cause(lab):
    s = settings_for(lab)
    (event,) = files(lab, 1)
    with declared(s):
        ingest(s, [event])
    dataset = f"LST1_{lab.tag}_20261124_raw"
    (rule_id,) = lab.client.add_replication_rule([{"scope": "lst", "name": dataset}], 1, f"{ARCHIVE}|{SOURCE}",
                                                 lifetime=1, locked=True)
    time.sleep(2)
    lab.server.run_daemons("judge-cleaner")
    found = [f for f in sweep(s) if f.kind == "rule-expired"]
    assert len(found) == 1 and rule_id in found[0].detail and "remaining lifetime -" in found[0].detail
    assert "locked" in found[0].detail


def test_status_counts_equal_what_rucio_shows_with_files_in_every_stage(lab, tmp_path):
    s = settings_for(lab)
    a, b, c, d = (files(lab, 2, night=f"2026112{i}") for i in range(4))
    with declared(s):
        ingest(s, a)
        lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])
        sweep(s)
        lab.server.run_daemons("reaper", rses=[SOURCE])  # a: archived (a sweep would announce them)
        ingest(s, b)
        lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])
        sweep(s)  # b: released, the reaper has not run
        ingest(s, c)
        lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])  # c: replicated, not released
        forged = FileClosed.create(**{**d[0].model_dump(exclude={"event_id", "schema_"}), "adler32": "0badf00d"})
        ingest(s, [*d, forged])  # d: replicating; the forged one: dead-lettered (checksum-conflict)
        data = status.collect(s, ClientGateway(s.rucio))
        cfg = tmp_path / "c.toml"
        cfg.write_text(_toml(s, lab))
        cli = subprocess.run([sys.executable, "-m", "injector.cli", "status", "--json", "--night", "20261123"],
                             env={**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}, capture_output=True, text=True,
                             timeout=120)
    stages = {ds.split("_")[-2]: counts for ds, counts in data["streams"]["lst1-raw"].items()}
    expected = {"20261120": "archived", "20261121": "released", "20261122": "replicated", "20261123": "replicating"}
    assert stages["20261123"]["dead-lettered"] == 1 and stages["20261120"]["dead-lettered"] == 0
    for night, stage in expected.items():
        assert stages[night]["registered"] == 2 and stages[night][stage] == 2, (night, stages[night])
        assert sum(stages[night][k] for k in status.STAGES if k not in ("registered", "stuck", "dead-lettered")) == 2
    # ... and Rucio's own API agrees, file by file.
    for batch, night in ((a, "20261120"), (b, "20261121"), (c, "20261122"), (d, "20261123")):
        reps = lab.replicas([e.path for e in batch])
        states = [r["states"] for r in reps.values()]
        if expected[night] == "archived":
            assert all(st == {ARCHIVE: "AVAILABLE"} for st in states)
        elif expected[night] == "replicating":
            assert all(ARCHIVE not in st or st[ARCHIVE] != "AVAILABLE" for st in states)
        else:
            assert all(st == {SOURCE: "AVAILABLE", ARCHIVE: "AVAILABLE"} for st in states)
    assert data["queues"][s.ingest.queue] == {"messages": 0, "consumers": 0}
    assert data["queues"][topology.dead_letter_queue(s.ingest.queue)]["messages"] == 1
    assert cli.returncode == 0, cli.stderr
    only = json.loads(cli.stdout)["streams"]["lst1-raw"]
    assert list(only) == [f"lst:LST1_{lab.tag}_20261123_raw"]
