"""Cleanup end to end on real parts: publish → ingest → Rucio's daemons (transfers really copy bytes,
hermes sends over STOMP) → cleanup → reaper → file-archived; on RabbitMQ-STOMP and on ActiveMQ."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kombu
import pytest
import stomp

from consumers.services import cleanup_worker
from injector import topology
from injector.checksum import size_and_adler32
from injector.config import Settings
from injector.events import FileClosed, decode_file_archived
from injector.testbed.rucio import HermesBroker
from injector.worker import BatchWorker
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.hermes import HermesSender
from tests.integration.rabbit import (
    AMQP_URL,
    dead_letters,
    declared,
    get_all,
    ingested,
    running,
    taken,
    unique_settings,
    wait_for,
)
from tests.integration.test_ingest_rucio import files

pytestmark = pytest.mark.integration

RABBIT_STOMP = ("127.0.0.1", 61613)


@pytest.fixture(params=["rabbitmq", "activemq"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(flavour: str, request: pytest.FixtureRequest) -> tuple[str, str, int]:
    """(flavour, STOMP host, port) of hermes' broker; "activemq-only": the DAQ broker is that ActiveMQ too."""
    if flavour in ("activemq", "activemq-only"):
        amq = request.getfixturevalue("activemq")
        return flavour, "127.0.0.1", amq.stomp_port
    return flavour, *RABBIT_STOMP


def cleanup_settings(lab: Lab, broker: tuple[str, str, int], **over: Any) -> Settings:
    flavour, host, port = broker
    tag = lab.tag
    cleanup: dict[str, Any] = {"flavour": flavour.removesuffix("-only"), "stomp_hosts": [f"{host}:{port}"],
                               "batch_window": 0.1, "heartbeat_ms": 2000}
    if flavour == "rabbitmq":
        cleanup |= {"hermes_destination": f"/topic/t-{tag}.rucio.events", "queue": f"t-{tag}.cleanup"}
    else:
        cleanup |= {"hermes_destination": f"/topic/VirtualTopic.t-{tag}", "app": f"app-{tag}"}
    daq: dict[str, Any] = {"delivery_limit": 3}
    if flavour == "activemq-only":
        daq["urls"] = [f"stomp://guest:guest@{host}:{port}"]
    return unique_settings({"streams": [lab.stream(**over)]}, ingest={"batch_window": 0.1}, cleanup=cleanup,
                           broker=daq)


def hermes_for(settings: Settings) -> HermesBroker:
    host, _, port = settings.cleanup.stomp_hosts[0].rpartition(":")
    return HermesBroker(host=host, port=int(port), destination=settings.cleanup.hermes_destination)


@contextmanager
def cleanup_running(settings: Settings, n: int = 1) -> Iterator[list[BatchWorker]]:
    workers = [cleanup_worker(settings) for _ in range(n)]
    for w in workers:
        w.batching.retry_pause = 0.2
    with running(*workers):
        # ActiveMQ creates the virtual topic's consumer queue at the first SUBSCRIBE; wait for it.
        wait_for(lambda: all(w.metrics.health()[0] for w in workers), timeout=30, what="cleanup subscribed")
        yield workers


def outcomes(workers: list[BatchWorker], label: str) -> int:
    return sum(w.stats.outcomes.get(label, 0) for w in workers)


def archive_path(lab: Lab, name: str) -> Path | None:
    for rep in lab.client.list_replicas([{"scope": "lst", "name": name}], rse_expression=ARCHIVE):
        for pfn in rep["rses"].get(ARCHIVE, []):
            return Path(urlparse(pfn).path)
    return None


@pytest.mark.parametrize("flavour", ["rabbitmq", "activemq", "activemq-only"])
def test_transfer_release_reap_and_file_archived_end_to_end(lab, broker):
    s = cleanup_settings(lab, broker)
    events = files(lab, 4)
    with declared(s), cleanup_running(s) as workers:
        ingested(s, events)
        lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", "hermes",
                               rses=[SOURCE, ARCHIVE], hermes=hermes_for(s))
        wait_for(lambda: outcomes(workers, "released") == 4, timeout=60, what="4 sources released")
        lab.server.run_daemons("reaper", "hermes", rses=[SOURCE, ARCHIVE], hermes=hermes_for(s))
        wait_for(lambda: outcomes(workers, "archived") == 4, timeout=60, what="4 file-archived")
        archived = [decode_file_archived(body) for body in taken(s, topology.archived_queue(s))]
        assert not dead_letters(s) and not dead_letters(s, s.cleanup.consumer_queue)
    for e in events:
        assert not Path(e.path).exists(), f"{e.path} still in the buffer"
        copy = archive_path(lab, e.path)
        assert copy is not None and size_and_adler32(copy) == (e.size, e.adler32)
        assert list(lab.replicas([e.path])[e.path]["states"]) == [ARCHIVE]
    assert sorted(a.name for a in archived) == sorted(e.path for e in events)
    assert all(a.destinations == [ARCHIVE] and a.routing_key == "file.archived.ORM.LST1" for a in archived)


def transfer_done(e: FileClosed, adler: str | None = None) -> dict[str, Any]:
    return {"scope": "lst", "name": e.path, "src-rse": SOURCE, "dst-rse": ARCHIVE, "checksum-adler": adler or e.adler32,
            "file-size": e.size, "bytes": e.size, "activity": "User Subscriptions"}


def test_forged_or_early_rucio_events_change_nothing_cleanup_trusts_rucio_not_the_event(lab, broker):
    """Anyone who can publish on hermes' topic can send Rucio-shaped events: cleanup takes every decision from
    Rucio's state, so a transfer-done before any transfer, one with another checksum, and a deletion-done for a
    source Rucio still holds release nothing, announce nothing, and are counted (not-yet-safe,
    checksum-mismatch, source-still-present)."""
    s = cleanup_settings(lab, broker)
    early, forged = files(lab, 2)
    with declared(s), cleanup_running(s) as workers:
        ingested(s, [early, forged])
        with HermesSender(s) as hermes:
            hermes.send("transfer-done", transfer_done(early))  # no transfer has happened
            hermes.send("transfer-done", transfer_done(forged, adler="00000001"))  # other checksum
            hermes.send("deletion-done", {"scope": "lst", "name": early.path, "rse": SOURCE,
                                          "url": f"file://localhost{early.path}", "bytes": early.size})
        wait_for(lambda: sum(w.stats.messages for w in workers) >= 3, timeout=30, what="the three events handled")
        assert outcomes(workers, "not-yet-safe") == 1 and outcomes(workers, "released") == 0
        assert outcomes(workers, "source-still-present") == 1 and outcomes(workers, "archived") == 0
        wait_for(lambda: len(cleanup_dead_letters(s)) >= 1, timeout=20, what="the forged event dead-lettered")
        dead = cleanup_dead_letters(s)
        assert taken(s, topology.archived_queue(s)) == [], "no file-archived for a file whose source is still there"
    lab.server.run_daemons("reaper", rses=[SOURCE])
    for e in (early, forged):
        assert Path(e.path).exists(), "the source was deleted without a verified archive copy"
        assert SOURCE in lab.replicas([e.path])[e.path]["states"]
    assert not any("injector_released_at" in m or "injector_announced" in m
                   for m in lab.json_meta([e.path for e in (early, forged)]).values()), "no mark written"
    (h,) = dead
    assert h["dlq-reason"] == "checksum-mismatch" and forged.path in h["dlq-error"]


_seen_dead: dict[str, list[dict[str, Any]]] = {}


def cleanup_dead_letters(s: Settings) -> list[dict[str, Any]]:
    """Headers of what the cleanup consumer dead-lettered: RabbitMQ <queue>.dlq, ActiveMQ DLQ.<queue>."""
    if s.cleanup.flavour == "rabbitmq":
        dlq = topology.dead_letter_queue(s.cleanup.queue)
        got = [dict(m.properties["application_headers"]) for m in get_all(s, dlq)]
    else:
        got = _stomp_take(s, "/queue/" + topology.dead_letters_of(s, s.cleanup.consumer_queue))
    _seen_dead.setdefault(s.cleanup.queue + s.cleanup.app, []).extend(got)
    return _seen_dead[s.cleanup.queue + s.cleanup.app]


def _stomp_take(s: Settings, destination: str, wait: float = 1.0) -> list[dict[str, Any]]:
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    frames: list[dict[str, Any]] = []
    conn = stomp.Connection12([(host, int(port))], vhost="/")

    class Take(stomp.ConnectionListener):
        def on_message(self, frame: Any) -> None:
            frames.append(dict(frame.headers))
            conn.ack(frame.headers["ack"])

    conn.set_listener("take", Take())
    conn.connect("guest", "guest", wait=True)
    conn.subscribe(destination, id="take", ack="client-individual")
    time.sleep(wait)
    conn.disconnect()
    return frames


@contextmanager
def captured_hermes(lab: Lab) -> Iterator[tuple[HermesBroker, list[tuple[str, dict[str, str]]]]]:
    """Real hermes sending to a capture queue of the test's own (RabbitMQ's STOMP plugin: /topic/K is amq.topic K):
    yields hermes' address and, once the block ends, the frames it sent (body, headers), as hermes made them."""
    key = f"capture-{lab.tag}"
    frames: list[tuple[str, dict[str, str]]] = []
    with kombu.Connection(AMQP_URL) as conn:
        ch = conn.channel()
        ch.queue_declare(key, durable=False, auto_delete=False)
        ch.queue_bind(key, "amq.topic", key)
        try:
            yield HermesBroker(destination=f"/topic/{key}"), frames
            while (m := ch.basic_get(key, no_ack=True)) is not None:
                body = m.body.decode() if isinstance(m.body, bytes) else m.body
                frames.append((body, {"event_type": str((m.headers or {}).get("event_type", ""))}))
        finally:
            ch.queue_delete(key)


def test_hermes_own_frames_three_times_shuffled_two_consumers_release_every_source_and_announce_each_file_once(
        lab, broker):
    s = cleanup_settings(lab, broker)
    events = files(lab, 5)
    names = {e.path for e in events}
    with declared(s), cleanup_running(s, n=2) as workers:
        ingested(s, events)
        lab.discard_rucio_events()  # hermes sends everything pending: only this test's events are captured
        with captured_hermes(lab) as (capture, transfers):
            lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", "hermes",
                                   rses=[SOURCE, ARCHIVE], hermes=capture)
        ours = [(b, h) for b, h in transfers if json.loads(b)["payload"].get("name") in names]
        assert sum(h["event_type"] == "transfer-done" for _, h in ours) == 5, [h for _, h in ours]
        with HermesSender(s) as hermes:
            frames = ours * 3  # hermes' own frames, each three times (hermes retries; brokers redeliver)
            random.Random(11).shuffle(frames)
            for body, headers in frames:
                hermes.send_raw(body, headers)
            wait_for(lambda: sum(w.stats.messages for w in workers) == len(frames), timeout=60, what="frames")
            with captured_hermes(lab) as (capture, deletions):
                lab.server.run_daemons("reaper", "hermes", rses=[SOURCE], hermes=capture)
            assert not any(Path(e.path).exists() for e in events)
            gone = [(b, h) for b, h in deletions
                    if h["event_type"] == "deletion-done" and json.loads(b)["payload"].get("name") in names] * 3
            assert len(gone) == 15, deletions
            random.Random(12).shuffle(gone)
            for body, headers in gone:
                hermes.send_raw(body, headers)
            wait_for(lambda: outcomes(workers, "archived") == len(gone), timeout=60, what="deletion-done handled")
        received = [decode_file_archived(m.body) for m in get_all(s, topology.archived_queue(s))]
    assert all(w.stats.messages > 0 for w in workers), "both consumers took part"
    # A duplicate may release again while the tombstoned source still exists (idempotent): what is exact is that
    # every transfer-done settles as a release or a source already gone, every source is reaped, one
    # file-archived per file.
    assert outcomes(workers, "released") >= 5
    assert outcomes(workers, "released") + outcomes(workers, "source-gone") == 15
    # One outcome per file, whoever handled which duplicate: the DAQ dedupes on the deterministic event_id.
    by_file: dict[str, set[tuple[str, str]]] = {}
    for a in received:
        by_file.setdefault(a.name, set()).add((str(a.event_id), a.archived_at.isoformat()))
    assert sorted(by_file) == sorted(names)
    assert all(len(v) == 1 for v in by_file.values()), by_file
    for e in events:
        copy = archive_path(lab, e.path)
        assert copy is not None and size_and_adler32(copy) == (e.size, e.adler32)


def test_events_for_files_no_stream_manages_are_acked_and_counted(lab, broker):
    s = cleanup_settings(lab, broker)
    with declared(s), cleanup_running(s) as workers:
        with HermesSender(s) as hermes:
            hermes.send("transfer-done", {"scope": "atlas", "name": "other.root", "dst-rse": "CERN"})
            hermes.send("deletion-done", {"scope": "lst", "name": "/elsewhere/x", "rse": "OTHER-RSE"})
            hermes.send("rule_ok", {"scope": "lst", "name": "x", "rule_id": "0"})
        wait_for(lambda: sum(w.stats.messages for w in workers) == 3, timeout=30, what="3 events")
        assert outcomes(workers, "unmanaged") == 2 and outcomes(workers, "ignored-rule_ok") == 1


def test_a_rule_whose_expression_also_matches_the_source_never_counts_the_source_as_its_archive_copy(lab):
    # Rucio satisfies a copies=1 rule on "SOURCE|ARCHIVE" with the replica already at SOURCE: no transfer, the
    # only copy is the source. A transfer-done (forged, or for another rule) must not release it.
    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP),
                         rules=[{"rse_expression": f"{SOURCE}|{ARCHIVE}", "copies": 1}])
    (event,) = files(lab, 1)
    with declared(s), cleanup_running(s) as workers:
        ingested(s, [event])
        (rule,) = lab.rules(f"LST1_{lab.tag}_20261124_raw")
        assert rule["state"] == "OK", "the rule is satisfied by the source replica alone"
        with HermesSender(s) as hermes:
            hermes.send("transfer-done", transfer_done(event))
        wait_for(lambda: sum(w.stats.messages for w in workers) == 1, timeout=30, what="the event handled")
        assert outcomes(workers, "not-yet-safe") == 1 and outcomes(workers, "released") == 0
        assert not cleanup_dead_letters(s)
    (replica,) = lab.client.list_replicas([{"scope": "lst", "name": event.path}], all_states=True)
    assert replica["states"] == {SOURCE: "AVAILABLE"}
    lab.server.run_daemons("reaper", rses=[SOURCE])
    assert Path(event.path).exists(), "the reaper deleted the only copy"
