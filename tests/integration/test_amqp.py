"""The AMQP side on the real RabbitMQ: topology, confirmed publishing, the batch worker."""

from __future__ import annotations

import json
import time

import pytest

from consumers.services import ingest_worker
from injector import deadletter, topology
from injector.errors import PublishFailed
from injector.events import FileClosed, encode
from injector.messages import Outgoing
from injector.testing import FakeRucio, Unavailable
from injector.transport.amqp import Publisher, connection
from producers.publish import DaqPublisher
from tests.conftest import STREAMS
from tests.integration.rabbit import declared, depth, get_all, running, unique_settings, wait_for

pytestmark = pytest.mark.integration


def ev(n: int, **over: object) -> FileClosed:
    f = dict(site="ORM", instrument="LST1", path=f"/data/lst1/run{n:05d}.fits.fz", size=n, adler32=f"{n:08x}",
             night="20261124")
    f.update(over)
    return FileClosed.create(**f)


@pytest.fixture(params=["rabbitmq", "embedded"])
def settings(request: pytest.FixtureRequest):
    """The local RabbitMQ, and the demo's embedded broker: the same behaviour is expected of both."""
    broker = {"urls": [request.getfixturevalue("embedded_broker").amqp_url]} if request.param == "embedded" else {}
    with declared(unique_settings(STREAMS, broker=broker, ingest={"batch_window": 0.05})) as s:
        yield s


@pytest.fixture
def rabbit_settings():
    with declared(unique_settings(STREAMS, ingest={"batch_window": 0.05})) as s:
        yield s


@pytest.fixture
def rucio():
    return FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})


def test_broker_setup_twice_is_harmless(settings):
    conn = connection(settings.broker)
    try:
        assert topology.apply(conn, topology.declare(settings)) == topology.apply(conn, topology.declare(settings))
    finally:
        conn.release()


def test_setup_names_a_queue_that_exists_with_other_arguments():
    s = unique_settings(STREAMS)
    conn = connection(s.broker)
    ch = conn.channel()
    ch.queue_declare(s.ingest.queue, durable=True, auto_delete=False)  # classic, no dead-lettering
    try:
        with pytest.raises(topology.TopologyMismatch, match=f"queue {s.ingest.queue} .*declared differently"):
            topology.apply(conn, topology.declare(s))
    finally:
        conn.channel().queue_delete(s.ingest.queue)
        conn.release()


def test_unroutable_publish_is_an_error_not_silence(settings):
    conn = connection(settings.broker)
    try:
        with pytest.raises(PublishFailed, match="unroutable"):
            Publisher(conn).publish([Outgoing(settings.broker.dead_letter_exchange, "nobody-listens", b"{}")])
    finally:
        conn.release()


def test_published_events_are_ingested_and_acked(settings, rucio):
    with DaqPublisher(settings.broker) as daq:
        daq.publish([ev(i) for i in range(1, 201)])
    worker = ingest_worker(settings, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == 200, what="200 messages settled")
    assert len(rucio.pfns) == 200 and rucio.calls["add_replicas"] <= 4
    assert depth(settings, settings.ingest.queue) == 0


def test_bad_event_is_dead_lettered_with_reason_headers_and_untouched_body(settings, rucio):
    body = json.dumps({"schema": "file-closed/1", "size": "big"}).encode()
    conn = connection(settings.broker)
    Publisher(conn).publish([
        Outgoing(settings.broker.daq_exchange, "file.closed.ORM.LST1", body, {"trace": "abc"}, "m-bad"),
        Outgoing(settings.broker.daq_exchange, "file.closed.ORM.LST1", encode(ev(1)), {}, "m-good"),
    ])
    conn.release()
    worker = ingest_worker(settings, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == 2)
    (dead,) = get_all(settings, topology.dead_letter_queue(settings.ingest.queue))
    h = dead.properties["application_headers"]
    assert dead.body == body and dead.properties["message_id"] == "m-bad"
    assert h[deadletter.REASON] == "invalid-event" and "size" in h[deadletter.ERROR]
    assert h[deadletter.EXCHANGE] == settings.broker.daq_exchange
    assert h[deadletter.ROUTING_KEY] == "file.closed.ORM.LST1"
    assert h[deadletter.SOURCE_QUEUE] == settings.ingest.queue and h["trace"] == "abc"
    assert len(rucio.pfns) == 1


def test_a_failure_that_persists_while_rucio_is_healthy_is_dead_lettered_at_the_delivery_limit(rucio):
    s = unique_settings(STREAMS, broker={"delivery_limit": 3}, ingest={"batch_window": 0.05})
    with declared(s):
        rucio.fail("file_metadata", Unavailable("ServerConnectionException: refused"), times=100)
        with DaqPublisher(s.broker) as daq:
            daq.publish([ev(1)])
        worker = ingest_worker(s, rucio)
        worker.batching.retry_pause = 0.05
        with running(worker):
            wait_for(lambda: depth(s, topology.dead_letter_queue(s.ingest.queue)) == 1, what="dead letter")
        (dead,) = get_all(s, topology.dead_letter_queue(s.ingest.queue))
        h = dead.properties["application_headers"]
        assert h[deadletter.REASON] == "rucio-unavailable" and h[deadletter.ATTEMPTS] == 3
        assert "gave up after 3 deliveries" in h[deadletter.ERROR]


class SlowRucio(FakeRucio):
    def __init__(self, delay: float, **kw: object) -> None:
        super().__init__(**kw)
        self.delay = delay

    def register(self, registrations):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        super().register(registrations)


def test_heartbeats_keep_flowing_during_a_rucio_call_longer_than_the_heartbeat_window():
    s = unique_settings(STREAMS, broker={"heartbeat": 2}, ingest={"batch_window": 0.05})
    rucio = SlowRucio(9.0, rses={"ORM-BUFFER": "file://localhost/data/"})
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            daq.publish([ev(1)])
        worker = ingest_worker(s, rucio)
        with running(worker):
            wait_for(lambda: worker.stats.messages == 1, timeout=30)
        assert worker.stats.reconnects == 0
        assert rucio.calls["register"] == 1 and depth(s, s.ingest.queue) == 0


def test_stop_signal_finishes_the_batch_in_flight_then_exits(settings):
    rucio = SlowRucio(2.0, rses={"ORM-BUFFER": "file://localhost/data/"})
    with DaqPublisher(settings.broker) as daq:
        daq.publish([ev(i) for i in range(1, 51)])
    worker = ingest_worker(settings, rucio)
    with running(worker) as stop:
        wait_for(lambda: rucio.calls["register"] == 1, what="batch in flight")
        stop.set()
    assert worker.stats.messages == 50 and len(rucio.pfns) == 50
    assert depth(settings, settings.ingest.queue) == 0


def test_worker_reconnects_after_the_broker_closes_its_connection(rabbit_settings, rucio):
    import subprocess

    settings = rabbit_settings
    worker = ingest_worker(settings, rucio)
    with running(worker):
        wait_for(lambda: worker.metrics.health()[0], timeout=20, what="consuming")
        subprocess.run(["rabbitmqctl", "close_all_connections", "test"], check=True, capture_output=True)
        wait_for(lambda: worker.stats.reconnects >= 1, what="reconnect")
        with DaqPublisher(settings.broker) as daq:
            daq.publish([ev(1)])
        wait_for(lambda: worker.stats.messages == 1, what="message after reconnect")
    assert len(rucio.pfns) == 1


def test_dead_letter_exchange_is_the_broker_fallback_for_poison_messages(settings):
    """If consumers crash on a message, the queue's delivery limit dead-letters it by itself."""
    conn = connection(settings.broker)
    Publisher(conn).publish([Outgoing(settings.broker.daq_exchange, "file.closed.ORM.LST1", b"poison", {}, "p")])
    ch = conn.channel()
    for _ in range(settings.broker.delivery_limit + 1):
        m = None
        deadline = time.monotonic() + 5
        while m is None and time.monotonic() < deadline:
            m = ch.basic_get(settings.ingest.queue)
        if m is None:
            break
        ch.basic_reject(m.delivery_tag, requeue=True)
    conn.release()
    wait_for(lambda: depth(settings, topology.dead_letter_queue(settings.ingest.queue)) == 1, timeout=10)


def test_metrics_and_health_are_served_while_consuming(settings, rucio):
    import urllib.error
    import urllib.request

    from injector.metrics import serve

    worker = ingest_worker(settings, rucio)
    server = serve(worker.metrics, 0, "127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(base + "/healthz")  # not connected yet
        with running(worker):
            with DaqPublisher(settings.broker) as daq:
                daq.publish([ev(i) for i in range(1, 31)] + [ev(99, instrument="LST9")])
            wait_for(lambda: worker.stats.messages == 31)
            assert urllib.request.urlopen(base + "/healthz").status == 200
            text = urllib.request.urlopen(base + "/metrics").read().decode()
    finally:
        server.shutdown()
    assert 'rucio_injector_events_total{consumer="ingest",kind="done",outcome="registered"} 30.0' in text
    assert 'rucio_injector_dead_letters_total{consumer="ingest",reason="no-stream"} 1.0' in text
    assert "rucio_injector_batch_size_bucket" in text and "rucio_injector_oldest_unprocessed_seconds" in text
