"""Ingest on the real RabbitMQ and a real Rucio server: asserted through Rucio's API, not our return values."""

from __future__ import annotations

import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from consumers.services import ingest_worker
from injector import deadletter, topology
from injector.config import Settings
from injector.events import FileClosed, encode
from injector.gateway import ClientGateway
from injector.transport.amqp import connection
from producers.publish import DaqPublisher, file_closed
from tests.integration.cli import run, service
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import (
    activemq_site,
    config_toml,
    daq_publisher,
    dead_letters,
    declared,
    get_all,
    running,
    unique_settings,
    wait_for,
    waiting,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["rabbitmq", "activemq"])
def site(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The spine's tests run on RabbitMQ and on an ActiveMQ-only site (ingest over STOMP)."""
    if request.param == "activemq":
        return activemq_site(request.getfixturevalue("activemq").stomp_port)
    return {}


def settings_for(lab: Lab, *streams: dict, **sections: Any) -> Settings:
    return unique_settings({"streams": list(streams) or [lab.stream()]},
                           ingest={"batch_window": 0.1, **sections.pop("ingest", {})}, **sections)


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def files(lab: Lab, n: int, night: str = "20261124") -> list[FileClosed]:
    out = []
    for i in range(n):
        path = lab.write(f"{night}/LST-1.1.Run{i:05d}.fits.fz", os.urandom(64) + str(i).encode())
        out.append(file_closed(path, site="ORM", instrument="LST1", night=night, run=i))
    return out


def write_config(s: Settings, path: Path, streams_toml: str, ingest: str = "") -> Path:
    path.write_text(config_toml(s) + f'[ingest]\nqueue = "{s.ingest.queue}"\nbatch_window = 0.1\n{ingest}'
                    f'[metrics]\ningest_port = 0\n[outbox]\npath = "{s.outbox.file}"\n' + streams_toml)
    return path


def stream_toml(lab: Lab) -> str:
    s = lab.stream()
    return (f'[[streams]]\nname = "{s["name"]}"\nsite = "ORM"\ninstrument = "LST1"\nsource_rse = "{SOURCE}"\n'
            f'storage_root = "{s["storage_root"]}"\nscope = "lst"\ndataset = "{s["dataset"]}"\n'
            f'rules = [{{ rse_expression = "{ARCHIVE}", copies = 1, activity = "User Subscriptions" }}]\n')


def test_cli_publish_and_ingest_register_the_file_in_place_with_dataset_and_rule(lab, tmp_path, site):
    s = settings_for(lab, **site)
    data = b"LST-1 raw data " * 1000
    path = lab.write("20261124/LST-1.1.Run00042.0000.fits.fz", data)
    with declared(s):
        cfg = write_config(s, tmp_path / "injector.toml", stream_toml(lab))
        env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
        with service("ingest", env=env) as ingest:
            started = time.monotonic()
            run("publish", str(path), "--site", "ORM", "--instrument", "LST1", "--night", "20261124", "--run", "42",
                env=env)
            wait_for(lambda: lab.content(f"LST1_{lab.tag}_20261124_raw") == [str(path)], timeout=30,
                     what="the file attached in Rucio")
            print(f"\npublish → attached in Rucio: {time.monotonic() - started:.2f}s")
        err = ingest.err()
    rep = lab.replicas([str(path)])[str(path)]
    assert rep["rses"] == {SOURCE: [f"file://localhost{path}"]}
    assert (rep["bytes"], rep["adler32"], rep["states"][SOURCE]) == (len(data), adler(data), "AVAILABLE")
    (rule,) = lab.rules(f"LST1_{lab.tag}_20261124_raw")
    assert (rule["rse_expression"], rule["copies"], rule["activity"]) == (ARCHIVE, 1, "User Subscriptions")
    assert "registered" in err and f"lst:{path}" in err  # the log says what happened, per event
    if s.broker.transport == "stomp":  # the ActiveMQ-only site: consumed over STOMP, not AMQP
        assert f"subscribed to /queue/{s.ingest.queue} on 127.0.0.1:" in err


def test_duplicates_redeliveries_and_reordering_leave_exactly_one_of_everything(lab, site):
    s = settings_for(lab, **site)
    events = files(lab, 30) + files(lab, 10, night="20261125")
    again = [FileClosed.create(**{**e.model_dump(exclude={"event_id", "schema_"})}) for e in events[:10]]
    stream = events * 3 + again
    random.Random(7).shuffle(stream)
    with declared(s):
        with daq_publisher(s) as daq:
            daq.publish(stream)
        worker = ingest_worker(s)
        with running(worker):
            wait_for(lambda: worker.stats.messages == len(stream), timeout=60)
        assert not dead_letters(s)
    assert worker.stats.outcomes == {"registered": 40, "already-registered": len(stream) - 40}
    for night, n in (("20261124", 30), ("20261125", 10)):
        ds = f"LST1_{lab.tag}_{night}_raw"
        assert len(lab.content(ds)) == n
        assert len(lab.rules(ds)) == 1
    reps = lab.replicas([e.path for e in events])
    assert all(list(r["states"]) == [SOURCE] for r in reps.values()) and len(reps) == 40


def test_two_ingest_processes_racing_on_one_queue_make_one_replica_attachment_and_rule_set(lab, tmp_path, site):
    s = settings_for(lab, ingest={"batch_size": 50}, **site)
    events = files(lab, 300)
    stream = events + [FileClosed.create(**e.model_dump(exclude={"event_id", "schema_"})) for e in events]
    random.Random(3).shuffle(stream)
    with declared(s):
        cfg = write_config(s, tmp_path / "c.toml", stream_toml(lab), ingest="batch_size = 50\nprefetch = 100\n")
        env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
        logs = [tmp_path / f"ingest{i}.log" for i in range(2)]
        with service("ingest", env=env, log=logs[0]), service("ingest", env=env, log=logs[1]):
            with daq_publisher(s) as daq:
                daq.publish(stream)
            wait_for(lambda: len(lab.content(f"LST1_{lab.tag}_20261124_raw")) == 300, timeout=90,
                     what="300 files attached")
            wait_for(lambda: waiting(s, s.ingest.queue) == 0, timeout=30, what="queue drained and acked")
        assert not dead_letters(s)
    done = [[line.split(" done ")[1].split()[0] for line in log.read_text().splitlines() if " done " in line]
            for log in logs]
    assert all(done), "both processes must have taken part"
    labels = done[0] + done[1]
    # Each file is "registered" by whoever saw it absent first (both, when they raced), never lost.
    assert len(labels) == 600 and set(labels) == {"registered", "already-registered"}
    assert labels.count("registered") >= 300
    assert len(lab.rules(f"LST1_{lab.tag}_20261124_raw")) == 1
    reps = lab.replicas([e.path for e in events])
    assert len(reps) == 300 and all(r["rses"] == {SOURCE: [f"file://localhost{r['name']}"]} for r in reps.values())


def test_same_name_with_other_checksum_is_dead_lettered_and_rucio_keeps_the_original(lab, site):
    s = settings_for(lab, **site)
    (first,) = files(lab, 1)
    forged = FileClosed.create(**{**first.model_dump(exclude={"event_id", "schema_"}), "adler32": "deadbeef"})
    with declared(s):
        with daq_publisher(s) as daq:
            daq.publish([first])
            worker = ingest_worker(s)
            with running(worker):
                wait_for(lambda: worker.stats.messages == 1)
                daq.publish([forged])
                wait_for(lambda: worker.stats.messages == 2)
        (dead,) = dead_letters(s)
    assert dead.reason == "checksum-conflict" and "deadbeef" in dead.error
    assert (dead.id, dead.source_queue, dead.attempts) == (str(forged.event_id), s.ingest.queue, 1)
    assert dead.body == encode(forged)
    assert lab.replicas([first.path])[first.path]["adler32"] == first.adler32


def test_a_rival_registering_other_bytes_between_the_check_and_the_registration_is_refused_whole(lab, monkeypatch):
    # Another process registers the same name with other content between this batch's check and its registration:
    # Rucio compares the sizes and checksums in the same transaction (FileConsistencyMismatch) and adds nothing.
    s = settings_for(lab)
    (event,) = files(lab, 1)
    real = ClientGateway.register

    def rival_first(self: ClientGateway, registrations: Any) -> None:
        lab.client.add_replicas(rse=SOURCE, files=[{"scope": "lst", "name": event.path, "bytes": event.size,
                                                    "adler32": "0badc0de", "pfn": f"file://localhost{event.path}"}])
        real(self, registrations)

    monkeypatch.setattr(ClientGateway, "register", rival_first)
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            daq.publish([event])
        worker = ingest_worker(s)
        with running(worker):
            wait_for(lambda: worker.stats.messages == 1)
        (dead,) = get_all(s, topology.dead_letter_queue(s.ingest.queue))
    h = dead.properties["application_headers"]
    assert h[deadletter.REASON] == "checksum-conflict" and "0badc0de" in h[deadletter.ERROR]
    assert worker.stats.outcomes.get("registered", 0) == 0
    assert lab.replicas([event.path])[event.path]["adler32"] == "0badc0de"
    assert lab.content(f"LST1_{lab.tag}_20261124_raw") == [], "the rival's file was not attached as this one"


def test_a_file_rucio_refuses_is_dead_lettered_without_delaying_its_neighbours(lab, tmp_path):
    outside = tmp_path / "not-under-the-rse-prefix"
    bad_stream = lab.stream(name="lst2-raw", instrument="LST2", storage_root=str(outside))
    s = settings_for(lab, lab.stream(), bad_stream)
    good = files(lab, 20)
    bad_path = outside / "run.fits.fz"
    outside.mkdir()
    bad_path.write_bytes(b"x")
    bad = file_closed(bad_path, site="ORM", instrument="LST2", night="20261124")
    batch = good[:10] + [bad] + good[10:]
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            daq.publish(batch)
        worker = ingest_worker(s)
        with running(worker):
            wait_for(lambda: worker.stats.messages == 21)
        (dead,) = get_all(s, topology.dead_letter_queue(s.ingest.queue))
    assert worker.stats.batches == 1, "the bad file was isolated inside the batch"
    h = dead.properties["application_headers"]
    assert h[deadletter.REASON] == "rucio-refused" and "RSEFileNameNotSupported" in h[deadletter.ERROR]
    assert len(lab.content(f"LST1_{lab.tag}_20261124_raw")) == 20


def test_one_refused_file_in_a_batch_of_1000_is_found_by_bisection_not_one_call_per_file(lab, tmp_path, monkeypatch):
    outside = tmp_path / "not-under-the-rse-prefix"
    outside.mkdir()
    # Rules kept at the source: 999 transfers would hold up the session server's conveyor for the tests after.
    at_source = [{"rse_expression": SOURCE, "copies": 1}]
    bad_stream = lab.stream(name="lst2-raw", instrument="LST2", storage_root=str(outside), rules=at_source)
    # A window long enough for the 1000 queued events to fill one batch on a busy machine (it closes at 1000).
    s = settings_for(lab, lab.stream(rules=at_source), bad_stream, ingest={"batch_window": 5.0})
    (outside / "run.fits.fz").write_bytes(b"x")
    bad = file_closed(outside / "run.fits.fz", site="ORM", instrument="LST2", night="20261124")
    good = files(lab, 999)
    calls: list[int] = []
    real = ClientGateway.register

    def counted(self: ClientGateway, registrations: Any) -> None:
        calls.append(sum(len(g.replicas) for g in registrations))
        real(self, registrations)

    monkeypatch.setattr(ClientGateway, "register", counted)
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            daq.publish(good[:500] + [bad] + good[500:])
        worker = ingest_worker(s)
        with running(worker):
            wait_for(lambda: worker.stats.messages == 1000, timeout=120)
        assert len(get_all(s, topology.dead_letter_queue(s.ingest.queue))) == 1
    assert worker.stats.batches == 1 and calls[0] == 1000
    # Halving: each level retries both halves once, so ≤ 1 + 2·⌈log2 1000⌉ = 21 calls, not 1 + 1000.
    assert len(calls) <= 21, f"{len(calls)} registration calls for one bad file in 1000"
    assert len(lab.content(f"LST1_{lab.tag}_20261124_raw")) == 999


def test_rucio_unreachable_from_the_start_holds_the_event_unacked_and_dead_letters_nothing(lab, tmp_path):
    from rucio.client import Client

    s = settings_for(lab, broker={"delivery_limit": 2}, rucio={"probe_first": 0.1, "probe_cap": 0.3})
    (event,) = files(lab, 1)

    def dead_client() -> Client:
        return Client(rucio_host="http://127.0.0.1:9", auth_host="http://127.0.0.1:9", account="root",
                      auth_type="userpass", creds={"username": "ddmlab", "password": "secret"}, timeout=2)

    gateway = ClientGateway(s.rucio, factory=dead_client)
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            daq.publish([event])
        worker = ingest_worker(s, gateway)
        with running(worker):
            wait_for(lambda: gateway.breaker.open, timeout=60, what="breaker open")
            time.sleep(3)  # dozens of probes, each would have been a delivery before
            assert worker.stats.messages == 0 and gateway.breaker.probes > 3
            assert worker.metrics.ready()[0] is False and "Cannot connect" in worker.metrics.rucio()
            assert dead_letter_count(s) == 0
        (held,) = get_all(s, s.ingest.queue)  # handed back at the stop, its budget untouched
    assert held.body == encode(event)
    assert not (held.properties["application_headers"] or {}).get("injector-retries")


def dead_letter_count(s: Settings) -> int:
    with connection(s.broker) as conn:
        return conn.channel().queue_declare(topology.dead_letter_queue(s.ingest.queue), passive=True).message_count
