"""An ActiveMQ-only site: the DAQ's events, ingest, its dead letters and the operator's tools all on ActiveMQ, over
STOMP, with RabbitMQ's guarantees: receipts as confirms, client-individual acks after the effect, retries counted
to the delivery limit, DLQ.<queue> dead letters with our headers and the body untouched, a durable outbox while
the broker is away. (The Rucio-backed spine, duplicates, reordering and two racing processes, is parametrised over
both brokers in test_ingest_rucio.py; the cleanup's file-archived on ActiveMQ in test_cleanup_rucio.py.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from consumers.services import ingest_worker
from injector.config import Settings
from injector.events import decode_file_closed, encode
from injector.messages import Outgoing
from injector.testbed.rucio import free_port
from injector.testing import FakeRucio, Unavailable
from injector.topology import Routes
from injector.transport import plugin
from producers.publish import DaqPublisher
from tests.conftest import STREAMS
from tests.integration.cli import run
from tests.integration.rabbit import (
    activemq_site,
    config_toml,
    dead_letters,
    declared,
    running,
    taken,
    unique_settings,
    wait_for,
    waiting,
)
from tests.integration.test_amqp import ev
from tests.integration.test_watch import watching

pytestmark = pytest.mark.integration


def amq_settings(port: int, base: dict[str, Any] = STREAMS, **sections: Any) -> Settings:
    site = activemq_site(port)
    site["broker"] |= sections.pop("broker", {})
    return unique_settings(base, ingest={"batch_window": 0.05, **sections.pop("ingest", {})}, **site, **sections)


@pytest.fixture
def s(activemq: Any, tmp_path: Path) -> Any:
    with declared(amq_settings(activemq.stomp_port, outbox={"path": str(tmp_path / "outbox.sqlite")})) as s:
        yield s


@pytest.fixture
def rucio() -> FakeRucio:
    return FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})


def send(s: Settings, messages: list[Outgoing]) -> None:
    """Publish as any STOMP client of the DAQ broker would (receipted SENDs routed by the topology)."""
    sender = plugin("stomp").sender(s.broker, Routes(s))
    try:
        sender.publish(messages)
    finally:
        sender.close()


def write_config(s: Settings, path: Path, streams: str = "") -> Path:
    path.write_text(config_toml(s) + f'[ingest]\nqueue = "{s.ingest.queue}"\nbinding = "{s.ingest.binding}"\n'
                    f'[outbox]\npath = "{s.outbox.file}"\n[metrics]\ningest_port = 0\n' + streams)
    return path


def test_a_bad_event_is_dead_lettered_to_DLQ_queue_with_our_headers_and_its_body_untouched(s, rucio):
    body = json.dumps({"schema": "file-closed/1", "size": "big"}).encode()
    send(s, [Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", body, {"trace": "abc"}, "m-bad"),
             Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", encode(ev(1)), {}, "m-good")])
    worker = ingest_worker(s, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == 2, what="both settled")
        wait_for(lambda: waiting(s, s.ingest.queue) == 0, what="both acked")
    (dead,) = dead_letters(s)
    assert dead.queue == f"DLQ.{s.ingest.queue}" and dead.body == body and dead.id == "m-bad"
    assert dead.reason == "invalid-event" and "size" in dead.error and dead.headers["trace"] == "abc"
    assert (dead.source_queue, dead.exchange, dead.attempts) == (s.ingest.queue, f"/queue/{s.ingest.queue}", 1)
    assert len(rucio.pfns) == 1


def test_a_failure_that_persists_is_retried_and_dead_lettered_at_exactly_the_delivery_limit(activemq, rucio):
    s = amq_settings(activemq.stomp_port, broker={"delivery_limit": 3})
    with declared(s):
        rucio.fail("file_metadata", Unavailable("ServerConnectionException: refused"), times=100)
        send(s, [Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", encode(ev(1)), {}, "m-1")])
        worker = ingest_worker(s, rucio)
        worker.batching.retry_pause = 0.05
        with running(worker):
            wait_for(lambda: len(dead_letters(s)) == 1, timeout=30, what="the dead letter")
            (dead,) = dead_letters(s)
            assert waiting(s, s.ingest.queue) == 0
    assert dead.reason == "rucio-unavailable" and dead.attempts == 3 and "gave up after 3 deliveries" in dead.error
    assert rucio.calls["file_metadata"] == 3, "one try per delivery, the count carried across the retry copies"
    assert "injector-retries" not in dead.headers and dead.id == "m-1"


def test_a_thousand_publishes_with_activemq_unreachable_wait_in_the_outbox_and_arrive_once_when_it_is_back(s, rucio):
    down = s.broker.model_copy(update={"urls": [f"stomp://guest:guest@127.0.0.1:{free_port()}"]})
    events = [ev(i) for i in range(1, 1001)]
    started = time.monotonic()
    with DaqPublisher(down, outbox=s.outbox, routes=Routes(s), max_wait=0.5, close_timeout=0) as daq:
        daq.publish(events)
        took = time.monotonic() - started
        assert daq.depth() == 1000
    print(f"\n1000 publishes with ActiveMQ unreachable returned in {took:.2f}s")
    with DaqPublisher(s.broker, outbox=s.outbox, routes=Routes(s), background=False) as daq:  # the broker is back
        done = daq.flush(60)
        assert (done.sent, done.left, daq.depth()) == (1000, 0, 0)
    worker = ingest_worker(s, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == 1000, timeout=60, what="1000 ingested")
        time.sleep(1.0)  # a duplicate would arrive now
        assert worker.stats.messages == 1000 and waiting(s, s.ingest.queue) == 0
    assert len(rucio.pfns) == 1000 and not dead_letters(s)


def test_an_event_no_binding_takes_stays_in_the_outbox_reported_as_unroutable(activemq, tmp_path):
    s = amq_settings(activemq.stomp_port, ingest={"binding": "file.closed.ORM.#"},
                     outbox={"path": str(tmp_path / "outbox.sqlite")})
    with declared(s), DaqPublisher(s.broker, outbox=s.outbox, routes=Routes(s), background=False,
                                   close_timeout=0) as daq:
        daq.publish([ev(1, site="LP")])
        done = daq.flush(0)
        assert done.sent == 0 and done.left == 1 and daq.depth() == 1
        (why,) = done.parked.values()
        assert why.startswith(f"unroutable: exchange '{s.broker.daq_exchange}' has no queue bound for "
                              "'file.closed.LP.LST1'")
        assert waiting(s, s.ingest.queue) == 0


def test_cli_publish_broker_setup_status_and_dlq_list_and_replay_on_activemq(s, tmp_path, rucio_server):
    cfg = write_config(s, tmp_path / "c.toml")
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
    setup = run("broker", "setup", env=env).stdout
    assert f"ok  ActiveMQ 127.0.0.1:{s.broker.stomp.addresses[0][1]} answers" in setup
    assert f"/queue/{s.ingest.queue} (ingest consumers, competing)" in setup
    data = tmp_path / "Run00001.fits"
    data.write_bytes(b"x" * 100)
    run("publish", str(data), "--site", "ORM", "--instrument", "LST1", "--night", "20261124", env=env)
    (published,) = [decode_file_closed(b) for b in taken(s, s.ingest.queue)]
    assert (published.path, published.size) == (str(data), 100)
    send(s, [Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", b"not json", {}, "m-bad")])
    worker = ingest_worker(s, FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"}))
    with running(worker):
        wait_for(lambda: len(dead_letters(s)) == 1, what="the dead letter")
    status = json.loads(run("status", "--json", env=env).stdout)
    assert status["broker"] == "activemq"
    assert status["queues"] == {s.ingest.queue: {"messages": 0}, f"DLQ.{s.ingest.queue}": {"messages": 1},
                                s.ingest.queue.rsplit(".", 1)[0] + ".archived": {"messages": 0}}
    listed = json.loads(run("dlq", "list", "--json", env=env).stdout)["messages"]
    assert [(m["id"], m["reason"], m["queue"]) for m in listed] == [("m-bad", "invalid-event",
                                                                   f"DLQ.{s.ingest.queue}")]
    run("dlq", "replay", env=env)
    assert not dead_letters(s)
    (back,) = taken(s, s.ingest.queue)
    assert back == b"not json", "replayed into the queue it came from, the body untouched"


def test_watch_announces_over_stomp_and_records_a_refused_name_once_across_restarts(activemq, tmp_path):
    root = tmp_path / "buffer"
    night = root / "20261124"
    night.mkdir(parents=True)
    stream = {"name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": "ORM-BUFFER",
              "storage_root": str(root), "scope": "lst", "dataset": "LST1_{night}_raw",
              "path_fields": r"(?P<night>\d{8})/", "rules": [{"rse_expression": "PIC-ARCHIVE"}]}
    s = amq_settings(activemq.stomp_port, {"streams": [stream]}, outbox={"path": str(tmp_path / "outbox.sqlite")})
    old = time.time() - 3600
    for name in (b"LST-1.Run00001.fits", b"LST-1.Run00002\xff.fits"):
        path = os.path.join(os.fsencode(night), name)
        Path(os.fsdecode(path)).write_bytes(b"data " + name)
        os.utime(path, (old, old))
    with declared(s):
        for _ in range(2):  # a restart with --existing: the same files again
            with watching(s, existing=True):
                wait_for(lambda: waiting(s, s.ingest.queue) >= 1 and len(dead_letters(s)) >= 1, timeout=30,
                         what="one announced, one recorded")
            bodies = taken(s, s.ingest.queue)
            assert [decode_file_closed(b).path for b in bodies] == [str(night / "LST-1.Run00001.fits")]
        (refused,) = dead_letters(s)
    assert refused.reason == "bad-file-name" and refused.queue == f"DLQ.{s.ingest.queue}"
