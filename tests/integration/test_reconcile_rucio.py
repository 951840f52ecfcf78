"""The reconciler and status on the real Rucio server + RabbitMQ: lost events are finished from Rucio's state,
what cannot be finished is named; every claim is checked through Rucio's API, the disk or the broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kombu
import pytest

from consumers.cleanup import release
from injector import topology
from injector.config import Settings
from injector.events import FileClosed, archived_event_id, decode_file_archived
from injector.gateway import ClientGateway
from injector.testbed.rses import file_protocol, set_local_account_limit
from injector.testbed.rucio import free_port
from injector.transport.amqp import Publisher, connection
from operations import reconcile, status
from operations.findings import Finding
from tests.integration.cli import run
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import declared, get_all, ingested, unique_settings, wait_for
from tests.integration.test_ingest_rucio import files

pytestmark = pytest.mark.integration

TRANSFER = ("judge-evaluator", "submitter", "poller", "finisher")


def settings_for(lab: Lab, **stream: Any) -> Settings:
    return unique_settings({"streams": [lab.stream(**stream)]}, ingest={"batch_window": 0.1})


def sweep(s: Settings, **options: Any) -> list[Finding]:
    conn = connection(s.broker)
    try:
        return reconcile.sweep(s, ClientGateway(s.rucio), Publisher(conn).publish, reconcile.Options(**options))
    finally:
        conn.release()


def kinds(findings: list[Finding]) -> dict[str, int]:
    return dict(Counter(f"{f.action} {f.kind}" for f in findings))


def config_file(s: Settings, path: Path) -> Path:
    st = s.streams[0]
    path.write_text(
        f'[broker]\nurls = ["{s.broker.urls[0]}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
        f'dead_letter_exchange = "{s.broker.dead_letter_exchange}"\n[ingest]\nqueue = "{s.ingest.queue}"\n'
        f'[cleanup]\nqueue = "{s.cleanup.queue}"\nhermes_destination = "{s.cleanup.hermes_destination}"\n'
        f'[metrics]\nreconcile_port = 0\n[[streams]]\nname = "{st.name}"\nsite = "ORM"\ninstrument = "LST1"\n'
        f'source_rse = "{st.source_rse}"\nstorage_root = "{st.storage_root}"\nscope = "lst"\n'
        f'dataset = "{st.dataset}"\nrules = [{{ rse_expression = "{ARCHIVE}", copies = 1 }}]\n')
    return path


def cli(config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (RUCIO_CONFIG comes from the environment, as for any rucio client)."""
    return run(*args, config=config, expect=expect)


@contextmanager
def probe(s: Settings) -> Any:
    """A queue of the test's own bound to the DAQ exchange: what a DAQ would receive as file-archived."""
    name = f"probe-{uuid.uuid4().hex[:8]}"
    with kombu.Connection(s.broker.urls[0]) as conn:
        ch = conn.channel()
        ch.queue_declare(name, durable=True, auto_delete=False)
        ch.queue_bind(name, s.broker.daq_exchange, "file.archived.#")
    try:
        yield name
    finally:
        with kombu.Connection(s.broker.urls[0]) as conn:
            conn.channel().queue_delete(name)


def json_marks(lab: Lab, names: list[str]) -> dict[str, dict[str, Any]]:
    return lab.json_meta(names)


class Lines:
    """stdout lines of a running process, collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: self.lines.extend(iter(stdout.readline, "")), daemon=True).start()


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_lost_transfer_done_and_deletion_done_are_finished_by_reconcile_announcing_each_file_once(lab, tmp_path):
    s = settings_for(lab)
    events = files(lab, 3)
    names = [e.path for e in events]
    config = config_file(s, tmp_path / "injector.toml")
    with declared(s), probe(s) as daq_inbox:
        ingested(s, events)
        lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])  # no cleanup consumer: transfer-done is lost
        dry = cli(config, "reconcile", "--dry-run")
        assert dry.returncode == 0 and dry.stderr.strip().endswith("reconcile (dry run): 3 would release-source")
        assert sorted(line.split()[3] for line in dry.stdout.splitlines()) == sorted(f"lst:{n}" for n in names)
        assert all(json_marks(lab, names)[n].get("injector_released_at") is None for n in names), "dry run"
        assert all(r["states"][SOURCE] == "AVAILABLE" for r in lab.replicas(names).values())

        released = cli(config, "reconcile", "--json")
        assert released.returncode == 0, released.stderr
        found = json.loads(released.stdout)
        assert sorted(f["subject"] for f in found if (f["kind"], f["action"]) == ("release-source", "done")) == \
            sorted(f"lst:{n}" for n in names) and len(found) == 3
        assert all(json_marks(lab, names)[n].get("injector_released_at") for n in names)
        lab.server.run_daemons("reaper", rses=[SOURCE])
        assert not any(Path(n).exists() for n in names), "the reaper deleted the released sources"
        assert all(r["states"] == {ARCHIVE: "AVAILABLE"} for r in lab.replicas(names).values())

        # deletion-done is lost too. Within the grace period cleanup's deletion-done may still come: no announcement.
        assert kinds(sweep(s)) == {}
        # After it, the looping reconciler announces, then finds nothing more to do.
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "--config", str(config), "reconcile",
                                 "--every", "0.3", "--grace", "0", "--json", "--metrics-port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = Lines(proc)
        try:
            wait_for(lambda: len(out.lines) >= 3, timeout=60, what="three sweeps")
            health, metrics = scrape(port, "/healthz"), scrape(port, "/metrics")[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        sweeps = [json.loads(line) for line in out.lines]
        assert Counter((f["action"], f["kind"]) for f in sweeps[0]) == {("done", "announce-archived"): 3}
        assert all(sweep == [] for sweep in sweeps[1:]), sweeps
        assert health[0] == 200
        assert 'rucio_injector_events_total{consumer="reconcile",kind="done",outcome="done:announce-archived"} 3.0' \
            in metrics
        assert "rucio_injector_rucio_call_seconds_bucket" in metrics
        assert all(json_marks(lab, names)[n].get("injector_announced") for n in names)
        got = get_all(s, daq_inbox)
    archived = [decode_file_archived(m.body) for m in got]
    assert sorted(a.name for a in archived) == sorted(names), "exactly one file-archived per file"
    assert all(a.destinations == [ARCHIVE] and a.event_id == archived_event_id("lst", a.name) for a in archived)
    assert {(a.path, a.adler32, a.size) for a in archived} == {(e.path, e.adler32, e.size) for e in events}

    # Every file announced: the loop marked the dataset finished, and a sweep once it is old reads none of its files.
    dataset = f"LST1_{lab.tag}_20261124_raw"
    assert lab.json_meta([dataset])[dataset].get("injector_finished") == 3
    calls: Counter[str] = Counter()
    gw = ClientGateway(s.rucio, observe=lambda op, seconds, outcome: calls.update([op]))
    later = datetime.now(UTC) + timedelta(days=3)
    assert reconcile.sweep(s, gw, lambda m: None, reconcile.Options(), now=later) == []
    calls.pop("connect", None)
    if gw.bulk_plugin is False:  # a server before 41 (rucio/rucio#7323): the dataset's marks are read on their own
        assert calls == {"list_dids": 2, "get_metadata_bulk": 2, "get_metadata": 1}, "no file read"
    else:
        assert calls == {"list_dids": 2, "get_metadata_bulk": 1}, "datasets, their states, recent files: no file read"
    calls.clear()
    assert kinds(reconcile.sweep(s, gw, lambda m: None, reconcile.Options(full=True), now=later)) == {}
    if gw.bulk_plugin is False:
        assert calls["list_content"] == 1 and calls["list_did_rules"] == 1 and calls["get_metadata"] == 1 + 3, \
            "--full: every dataset's content and every file's marks, one by one; nothing written"
    else:
        assert calls == {"list_dids": 2, "get_metadata_bulk": 2, "list_content": 1, "list_did_rules": 1}, \
            "--full: every dataset's content and every file's marks; nothing written"


def test_the_dataset_marks_round_trip_through_rucio(lab):
    """What the bounded sweep keeps on a dataset (finished count, unattached names, cleared with null) as the real
    server stores and returns it, with the dataset's creation time."""
    s = settings_for(lab)
    gw = ClientGateway(s.rucio)
    dataset = f"LST1_{lab.tag}_20261124_raw"
    gw.add_dataset("lst", dataset, [])
    before = datetime.now(UTC)
    gw.mark([("lst", dataset, {"injector_finished": 3, "injector_unattached": ["/a/b c.fits", "/a/d"]})])
    (state,) = gw.dataset_states([("lst", dataset)]).values()
    assert (state.finished, state.unattached, state.is_open) == (3, ("/a/b c.fits", "/a/d"), True)
    assert state.created_at is not None and abs(state.created_at - before) < timedelta(minutes=1)
    gw.mark([("lst", dataset, {"injector_finished": None, "injector_unattached": None})])
    (state,) = gw.dataset_states([("lst", dataset)]).values()
    assert (state.finished, state.unattached) == (None, ())
    assert gw.list_files("lst", "*", created_after=datetime.now(UTC) + timedelta(minutes=5)) == []


def _own_source(lab: Lab, name: str) -> Path:
    """A source RSE of this test only (its settings are changed)."""
    root = lab.client.source_dir.parent / name.lower()
    root.mkdir()
    lab.client.add_rse(name, deterministic=False)
    lab.client.add_protocol(name, file_protocol(root))
    set_local_account_limit(lab.client, "root", name, -1)
    lab.client.add_distance(name, ARCHIVE, {"distance": 1})
    return root


@pytest.mark.parametrize("breakage", ["availability_delete", "empty_hostname", "rule_lock"])
def test_a_released_source_the_reaper_cannot_delete_is_diagnosed(lab, breakage):
    rse = f"BROKEN-{lab.tag.upper()}"
    root = _own_source(lab, rse)
    s = settings_for(lab, source_rse=rse, storage_root=str(root))
    lab.root = root
    events = files(lab, 2)
    with declared(s):
        ingested(s, events)
        lab.server.run_daemons(*TRANSFER, rses=[rse, ARCHIVE])
        assert kinds(sweep(s)) == {"done release-source": 2}
        pin = None
        if breakage == "availability_delete":
            lab.client.update_rse(rse, {"availability_delete": False})
        elif breakage == "empty_hostname":
            lab.client.delete_protocols(rse, "file")
            lab.client.add_protocol(rse, file_protocol(root, hostname=""))
            lab.server.forget_cache()  # Rucio serves the old protocol from memcached until it expires
        else:  # someone pins the dataset at the source after the release
            (pin,) = lab.client.add_replication_rule([{"scope": "lst", "name": f"LST1_{lab.tag}_20261124_raw"}], 1,
                                                     rse)
        log = lab.server.run_daemons("reaper", rses=[rse])
        assert all(Path(e.path).exists() for e in events)
        assert all(r["states"].get(rse) == "AVAILABLE" for r in lab.replicas([e.path for e in events]).values())
        assert kinds(sweep(s)) == {}, "within the grace period a released source is not yet suspicious"
        names = [e.path for e in events]
        before = lab.replica_rows(names, rse)
        found = sweep(s, grace=timedelta(0), fix=True)
    after = lab.replica_rows(names, rse)
    assert after == before, "no tombstone is set again while the RSE blocks (the replica rows are untouched)"
    assert kinds(found) == {"report source-not-deleted": 2}
    cause = {"availability_delete": "availability_delete false", "empty_hostname": "empty hostname",
             "rule_lock": f"rule {pin} ({rse}, state OK) holds a lock on the source replica"}[breakage]
    assert all(cause in f.detail for f in found), found[0].detail
    if breakage == "empty_hostname":
        assert "No default delete protocol" in log  # what the reaper itself said


def test_rules_past_their_lifetime_are_reported_with_id_state_lifetime_and_cause(lab):
    s = settings_for(lab)
    (event,) = files(lab, 1)
    with declared(s):
        ingested(s, [event])
    dataset = f"LST1_{lab.tag}_20261124_raw"
    c = lab.client
    (locked,) = c.add_replication_rule([{"scope": "lst", "name": dataset}], 1, f"{ARCHIVE}|{SOURCE}", locked=True)
    (plain,) = c.add_replication_rule([{"scope": "lst", "name": dataset}], 1, f"{SOURCE}|{ARCHIVE}")
    for rule_id in (locked, plain):
        c.update_replication_rule(rule_id, {"lifetime": -3600})  # expired an hour ago
    found = {f.detail.split()[1]: f for f in sweep(s) if f.kind == "rule-expired"}
    assert set(found) == {locked, plain}
    for rule_id, f in found.items():
        rule = c.get_replication_rule(rule_id)
        assert f.subject == f"lst:{dataset}" and f"state {rule['state']}" in f.detail
        assert "remaining lifetime -1h00m" in f.detail or "remaining lifetime -0h59m" in f.detail
        assert rule["expires_at"].replace(tzinfo=UTC) < datetime.now(UTC)
    assert "locked" in found[locked].detail and "judge-cleaner" in found[plain].detail
    lab.server.run_daemons("judge-cleaner")
    remaining = {r["id"] for r in lab.rules(dataset)}
    assert locked in remaining and plain not in remaining, "Rucio itself: the cleaner keeps only the locked rule"
    assert [f.detail.split()[1] for f in sweep(s) if f.kind == "rule-expired"] == [locked]


def rucio_counts(lab: Lab, dataset: str) -> dict[str, int]:
    """The stages of a dataset's files computed straight from Rucio's API (independently of `status`)."""
    c = lab.client
    names = sorted(d["name"] for d in c.list_content("lst", dataset))
    reps = lab.replicas(names)
    meta = json_marks(lab, names)
    stuck = {lk["name"] for r in lab.rules(dataset) for lk in c.list_replica_locks(r["id"]) if lk["state"] == "STUCK"}
    tombstoned = {n for n, when in lab.tombstones(names, SOURCE).items() if when is not None}
    counts = Counter({"registered": len(names)})
    for n in names:
        st = reps[n]["states"]
        safe = st.get(ARCHIVE) == "AVAILABLE"
        if SOURCE not in st:
            counts[("archived" if meta[n].get("injector_announced") else "announcing") if safe else "source-lost"] += 1
        elif not safe:
            counts["replicating"] += 1
            counts["stuck"] += n in stuck
        else:
            counts["released" if n in tombstoned else "replicated"] += 1  # Rucio's tombstone, not our mark
    return counts


def test_status_numbers_equal_what_rucio_shows_with_files_in_every_stage(lab, tmp_path):
    s = settings_for(lab)
    stage_of = {"20261120": "announcing", "20261121": "released", "20261122": "replicated", "20261123": "source-lost",
                "20261124": "replicating", "20261125": "stuck"}
    batch = {night: files(lab, 2, night=night) for night in stage_of}
    first = [e for night in ("20261120", "20261121", "20261122", "20261123") for e in batch[night]]
    src = [(e.path, SOURCE) for e in batch["20261123"]]
    with declared(s):
        ingested(s, first)
        # Source lost before its copy: the judge places the archive replica, an operator cancels the transfer (a
        # queued transfer protects its source from the reaper), then the source is deleted. (Had the source been
        # the file's last replica, Rucio would have removed the file DID itself.)
        lab.server.run_daemons("judge-evaluator")
        (lost_rule,) = lab.rules(f"LST1_{lab.tag}_20261123_raw")
        lab.client.update_replication_rule(lost_rule["id"], {"state": "STUCK", "cancel_requests": True})
        lab.client.set_tombstone([{"scope": "lst", "name": n, "rse": rse} for n, rse in src])
        lab.server.run_daemons("reaper", *TRANSFER[1:], rses=[SOURCE])
        gw = ClientGateway(s.rucio)
        release(gw, [("lst", e.path, SOURCE) for e in batch["20261120"]])
        lab.server.run_daemons("reaper", rses=[SOURCE])
        release(gw, [("lst", e.path, SOURCE) for e in batch["20261121"]])
        forged = FileClosed.create(**{**batch["20261124"][0].model_dump(exclude={"event_id", "schema_"}),
                                      "adler32": "0badf00d"})
        ingested(s, [*batch["20261124"], *batch["20261125"], forged])  # the forged one: dead-lettered (conflict)
        lab.server.run_daemons("judge-evaluator")  # locks REPLICATING; no transfer runs any more
        (stuck_rule,) = lab.rules(f"LST1_{lab.tag}_20261125_raw")
        lab.client.update_replication_rule(stuck_rule["id"], {"state": "STUCK", "cancel_requests": True})
        data = status.collect(s, gw)
        config = config_file(s, tmp_path / "injector.toml")
        one_night = cli(config, "status", "--json", "--night", "20261125")
        table = cli(config, "status")
        full = cli(config, "status", "--json", "--full")
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
        none_since = cli(config, "status", "--json", "--since", tomorrow)
        bad_since = cli(config, "status", "--since", "last tuesday", expect=2)
    shown = data["streams"]["lst1-raw"]
    assert sorted(shown) == sorted(f"lst:LST1_{lab.tag}_{night}_raw" for night in stage_of)
    for night, stage in stage_of.items():
        dataset = f"LST1_{lab.tag}_{night}_raw"
        expected = rucio_counts(lab, dataset)
        expected["dead-lettered"] = 1 if night == "20261124" else 0
        assert shown[f"lst:{dataset}"] == {k: expected.get(k, 0) for k in status.STAGES}, night
        assert expected[stage] == 2, (night, expected)  # the scenario really has every stage
    assert data["queues"][s.ingest.queue] == {"messages": 0, "consumers": 0}
    assert data["queues"][topology.dead_letter_queue(s.ingest.queue)]["messages"] == 1
    assert one_night.returncode == 0, one_night.stderr
    assert json.loads(one_night.stdout)["streams"]["lst1-raw"] == {
        f"lst:LST1_{lab.tag}_20261125_raw": shown[f"lst:LST1_{lab.tag}_20261125_raw"]}
    assert json.loads(full.stdout)["streams"] == data["streams"], "--full reads every file: the same counts"
    assert json.loads(none_since.stdout)["streams"]["lst1-raw"] == {}, "no dataset created since tomorrow"
    assert "'last tuesday' is not a date" in bad_since.stderr
    assert table.returncode == 0 and "source-lost" in table.stdout and s.ingest.queue in table.stdout
    row = next(line for line in table.stdout.splitlines() if f"LST1_{lab.tag}_20261123_raw" in line)
    assert [c.strip() for c in row.split("│")[2:-1]] == [str(shown[f"lst:LST1_{lab.tag}_20261123_raw"][k])
                                                         for k in status.STAGES]


def test_unknown_stream_is_refused_by_the_cli(lab, tmp_path):
    s = settings_for(lab)
    done = cli(config_file(s, tmp_path / "injector.toml"), "reconcile", "--stream", "nope", expect=2)
    assert "no stream named nope" in done.stderr

