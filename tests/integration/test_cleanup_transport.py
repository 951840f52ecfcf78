"""The cleanup consumer's link on every broker, without Rucio (RabbitMQ and the embedded broker: its queue over
AMQP; ActiveMQ: its virtual-topic queue over STOMP), fed by hermes-style STOMP frames: ack after effect, retry →
redelivery → our own dead letter at the delivery limit (counted across competing consumers), reconnect +
resubscribe after the network or the broker drops us, SIGTERM finishing the batch in flight."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import stomp

from consumers.services import cleanup_link
from injector import topology
from injector.messages import Delivery, Outgoing
from injector.settle import Outcome, Route
from injector.worker import Batching, BatchWorker
from tests.integration.hermes import HermesSender
from tests.integration.netfault import Proxy
from tests.integration.rabbit import declared, get_all, running, unique_settings, wait_for
from tests.integration.test_cleanup_rucio import cleanup_dead_letters as dead_letters

pytestmark = pytest.mark.integration


@pytest.fixture(params=["rabbitmq", "activemq", "embedded"])
def broker(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """Which broker: RabbitMQ's STOMP plugin, ActiveMQ, or the demo's embedded broker (RabbitMQ-like)."""
    if request.param == "activemq":
        return "activemq", request.getfixturevalue("activemq")
    if request.param == "embedded":
        return "embedded", request.getfixturevalue("embedded_broker")
    return "rabbitmq", None


def settings_for(flavour: str, handle: Any) -> Any:
    tag = uuid.uuid4().hex[:8]
    amqp: dict[str, Any] = {}
    if flavour == "activemq":
        cleanup = {"flavour": "activemq", "stomp_hosts": [f"127.0.0.1:{handle.stomp_port}"], "app": f"app-{tag}",
                   "hermes_destination": f"/topic/VirtualTopic.t-{tag}"}
    else:
        stomp_port = handle.stomp_port if flavour == "embedded" else 61613
        cleanup = {"flavour": "rabbitmq", "stomp_hosts": [f"127.0.0.1:{stomp_port}"], "queue": f"t-{tag}.cleanup",
                   "hermes_destination": f"/topic/t-{tag}.events"}
        amqp = {"urls": [handle.amqp_url]} if flavour == "embedded" else {}
    cleanup |= {"heartbeat_ms": 1000, "batch_window": 0.05}
    return unique_settings({"streams": []}, cleanup=cleanup, broker={"delivery_limit": 3, **amqp})


class Recorder:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        self.seen.extend(d.body for d in batch)
        return [Outcome("retry", "failing", None, "rucio-unavailable", "Rucio said 503") if d.body == b"poison"
                else Outcome.done("ok") for d in batch]


def worker_for(s: Any, process: Recorder) -> BatchWorker:
    c = s.cleanup
    route = Route(c.consumer_queue, s.broker.dead_letter_exchange, s.broker.delivery_limit)
    c = c.model_copy(update={"prefetch": min(c.prefetch, 50)})
    return BatchWorker(cleanup_link(s.model_copy(update={"cleanup": c})), route, process,
                       Batching(10, 0.05, c.prefetch, retry_pause=0.05))


def through(s: Any, proxy: Proxy) -> Any:
    """The same settings with the consumer's broker connection through `proxy`."""
    if s.cleanup.flavour == "activemq":
        hosts = [f"127.0.0.1:{proxy.port}"]
        return s.model_copy(update={"cleanup": s.cleanup.model_copy(update={"stomp_hosts": hosts})})
    url = s.broker.urls[0].replace(f":{proxy.upstream[1]}/", f":{proxy.port}/")
    return s.model_copy(update={"broker": s.broker.model_copy(update={"urls": [url]})})


def redelivery_period(s: Any) -> float:
    """How long a negative check waits: one full redelivery period of the broker, and some. ActiveMQ redelivers a
    message after 1 s (broker-config/activemq/activemq.xml redeliveryDelay); RabbitMQ returns it at once."""
    return 1.5 if s.cleanup.flavour == "activemq" else 0.5


def upstream(s: Any) -> tuple[str, int]:
    """Where the consumer's broker connection goes (STOMP on ActiveMQ, AMQP otherwise)."""
    if s.cleanup.flavour == "activemq":
        return s.cleanup.stomp_addresses[0]
    from urllib.parse import urlparse

    u = urlparse(s.broker.urls[0])
    return u.hostname or "127.0.0.1", u.port or 5672


def send(s: Any, *bodies: str) -> None:
    with HermesSender(s) as hermes:
        for b in bodies:
            hermes.send_raw(b)


def test_ack_after_effect_and_retry_then_our_dead_letter_at_the_limit(broker):
    s = settings_for(*broker)
    rec = Recorder()
    w = worker_for(s, rec)
    with declared(s), running(w):
        wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "a", "poison", "b")
        wait_for(lambda: w.stats.outcomes.get("ok") == 2 and w.stats.outcomes.get("failing") == 3, timeout=40,
                 what="2 done, poison tried 3 times")
        wait_for(lambda: len(dead_letters(s)) == 1, timeout=20, what="poison dead-lettered")
        (h,) = dead_letters(s)
    assert h["dlq-reason"] == "rucio-unavailable" and "gave up after 3 deliveries" in h["dlq-error"]
    assert int(h["dlq-attempts"]) == 3
    assert rec.seen.count(b"poison") == 3 and rec.seen.count(b"a") == 1


def test_reconnects_and_resubscribes_after_the_broker_drops_the_connection(broker):
    flavour, amq = broker
    s = settings_for(flavour, amq)
    proxy = Proxy(upstream(s))
    rec = Recorder()
    w = worker_for(through(s, proxy), rec)
    with declared(s), running(w):
        wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "before")
        wait_for(lambda: b"before" in rec.seen, what="first message")
        assert proxy.drop() == 1  # the network (or broker) drops the consumer's connection
        wait_for(lambda: w.stats.reconnects >= 1, timeout=30, what="reconnect")
        wait_for(lambda: w.metrics.health()[0], timeout=30, what="subscribed again")
        send(s, "after")
        wait_for(lambda: b"after" in rec.seen, timeout=30, what="a message after the reconnect")
        if flavour == "activemq":  # and a broker restart: persistent messages and the subscription come back
            amq.restart()
            send(s, "after-restart")
            wait_for(lambda: b"after-restart" in rec.seen, timeout=60, what="a message after a broker restart")
    proxy.close()
    assert w.stats.outcomes.get("ok", 0) >= 2


class Slow(Recorder):
    """Takes `pause` seconds per batch, so that deliveries spread over competing consumers."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause
        self.started = threading.Event()
        self.finished: list[bytes] = []

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        self.started.set()
        time.sleep(self.pause)
        outcomes = super().__call__(batch)
        self.finished.extend(d.body for d in batch)
        return outcomes


def with_prefetch(s: Any, prefetch: int) -> Any:
    return s.model_copy(update={"cleanup": s.cleanup.model_copy(update={"prefetch": prefetch})})


def test_two_consumers_share_the_work_and_a_failing_event_is_tried_delivery_limit_times_in_all(broker):
    s = with_prefetch(settings_for(*broker), 4)
    recs = [Slow(0.02), Slow(0.02)]
    workers = [worker_for(s, r) for r in recs]
    bodies = [f"m{i}" for i in range(60)]
    with declared(s), running(*workers):
        wait_for(lambda: all(w.metrics.health()[0] for w in workers), timeout=20, what="both subscribed")
        send(s, "poison", *bodies)
        wait_for(lambda: sum(w.stats.outcomes.get("ok", 0) for w in workers) == 60, timeout=40, what="60 done")
        wait_for(lambda: len(dead_letters(s)) == 1, timeout=30, what="poison dead-lettered")
        (h,) = dead_letters(s)
    seen = recs[0].seen + recs[1].seen
    assert sorted(b for b in seen if b != b"poison") == sorted(b.encode() for b in bodies)  # each exactly once
    assert all(any(b.startswith(b"m") for b in r.seen) for r in recs), "both consumers took part"
    # the count travels with the event, whichever consumer gets it: limit 3 means 3 tries in all
    assert seen.count(b"poison") == 3 and int(h["dlq-attempts"]) == 3


def test_stop_finishes_the_batch_in_flight_and_loses_nothing(broker):
    s = with_prefetch(settings_for(*broker), 2)
    first, second = Slow(1.0), Slow(0.0)
    w1 = worker_for(s, first)
    bodies = [f"m{i}" for i in range(8)]
    with declared(s):
        with running(w1) as stop:
            wait_for(lambda: w1.metrics.health()[0], timeout=20, what="subscribed")
            send(s, *bodies)
            assert first.started.wait(20)
            stop.set()  # what SIGTERM does; running() then joins the worker thread
        assert first.finished == first.seen and w1.stats.messages == len(first.seen) > 0  # nothing half-done
        w2 = worker_for(s, second)
        with running(w2):
            wait_for(lambda: len(first.seen) + len(second.seen) >= len(bodies), timeout=30, what="the rest")
            time.sleep(redelivery_period(s))  # would a settled event come back?
    assert sorted(first.seen + second.seen) == sorted(b.encode() for b in bodies)


def test_acks_follow_the_effect_so_a_batch_whose_connection_died_is_delivered_again(broker):
    flavour, amq = broker
    s = settings_for(flavour, amq)
    proxy = Proxy(upstream(s))
    rec = Slow(1.0)
    w = worker_for(through(s, proxy), rec)
    with declared(s), running(w):
        wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "x")
        assert rec.started.wait(20)
        proxy.drop()  # while the batch is being processed: its ack can no longer be sent
        wait_for(lambda: rec.finished.count(b"x") == 2, timeout=30, what="x delivered again after the reconnect")
        rec.pause = 0
        send(s, "y")
        wait_for(lambda: b"y" in rec.finished, timeout=30, what="y")
        time.sleep(redelivery_period(s))  # would x come a third time?
    proxy.close()
    assert rec.finished.count(b"x") == 2  # the second time it was acked: no third delivery


def test_rabbitmq_closing_the_consumers_connection_is_survived():
    """The broker itself closes the connection (ERROR frame, then the socket): reconnect, resubscribe."""
    vhost = f"t-{uuid.uuid4().hex[:8]}"  # closing the connections of this vhost only spares other tests
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True)
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True)
        s = unique_settings({"streams": []}, broker={"urls": [f"amqp://guest:guest@127.0.0.1:5672/{vhost}"]},
                            cleanup={"queue": "cleanup", "hermes_destination": "/topic/events", "vhost": vhost,
                                     "heartbeat_ms": 1000, "batch_window": 0.05})
        rec = Recorder()
        w = worker_for(s, rec)
        with declared(s), running(w):
            wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
            closed = subprocess.run([*ctl, "close_all_connections", "--vhost", vhost, "test"], check=True,
                                    capture_output=True, text=True).stdout
            assert "Closed 1 connections" in closed
            wait_for(lambda: w.stats.reconnects >= 1, timeout=30, what="reconnect")
            conn = stomp.Connection12([("127.0.0.1", 61613)], vhost=vhost)
            conn.connect("guest", "guest", wait=True)
            conn.send("/topic/events", "after", headers={"persistent": "true"})
            conn.disconnect()
            wait_for(lambda: b"after" in rec.seen, timeout=30, what="a message after the broker closed us")
    finally:
        subprocess.run([*ctl, "delete_vhost", vhost], check=False, capture_output=True)


class Announcing(Recorder):
    """Emits a file-archived-like message to the DAQ exchange for every event: cleanup's AMQP publishing."""

    def __init__(self, s: Any) -> None:
        super().__init__()
        self.exchange = s.broker.daq_exchange

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        self.seen.extend(d.body for d in batch)
        return [Outcome.done("archived", emit=(Outgoing(self.exchange, "file.archived.ORM.LST1", d.body),))
                for d in batch]


def test_an_idle_consumer_keeps_its_connections_through_three_heartbeat_intervals(broker):
    flavour, handle = broker
    s = settings_for(flavour, handle)
    s = s.model_copy(update={"broker": s.broker.model_copy(update={"heartbeat": 2})})
    rec = Announcing(s)
    w = worker_for(s, rec)
    with declared(s), running(w):
        wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "first")
        wait_for(lambda: w.stats.outcomes.get("archived") == 1, timeout=20, what="first announced")
        time.sleep(3 * 2 + 2)  # idle: nothing consumed, nothing published
        send(s, "second")
        wait_for(lambda: w.stats.outcomes.get("archived") == 2, timeout=20, what="second announced")
        archived = get_all(s, topology.archived_queue(s))
    assert w.stats.reconnects == 0, "an idle consumer lost a connection"
    assert sorted(m.body for m in archived) == [b"first", b"second"]


def test_activemq_gives_back_what_a_disconnecting_consumer_held_without_counting_or_dead_lettering(activemq):
    s = settings_for("activemq", activemq)
    with declared(s):
        rec = Recorder()
        w = worker_for(s, rec)
        with running(w):  # creates the consumer queue
            wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "held")
        for generation in range(10):  # ten consumers receive it and stop without settling it
            buffer: list[Delivery] = []
            link = cleanup_link(s)(generation, buffer)
            try:
                received = lambda link=link, buffer=buffer: link.pump(0.1) or bool(buffer)  # noqa: E731
                wait_for(received, timeout=20, what="the message received")
                assert buffer[0].attempts == 1
            finally:
                link.close()
        attempts = Attempts()
        w = worker_for(s, attempts)
        with running(w):
            wait_for(lambda: attempts.seen_attempts == [1], timeout=20, what="delivered as a first attempt")
    assert not dead_letters(s)


class Attempts(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.seen_attempts: list[int] = []

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        self.seen_attempts.extend(d.attempts for d in batch)
        return super().__call__(batch)


class Busy(Announcing):
    """Announces like Announcing, after working `seconds` on each batch (a slow Rucio)."""

    def __init__(self, s: Any, seconds: float) -> None:
        super().__init__(s)
        self.seconds = seconds

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        time.sleep(self.seconds)
        return super().__call__(batch)


def test_a_consumer_busy_for_three_heartbeat_intervals_keeps_its_connections(broker):
    # STOMP heart-beats on ActiveMQ (heartbeat_ms 1000), AMQP heartbeats on RabbitMQ and the embedded broker (2 s):
    # they keep flowing while a batch takes longer than the broker's patience.
    flavour, handle = broker
    s = settings_for(flavour, handle)
    s = s.model_copy(update={"broker": s.broker.model_copy(update={"heartbeat": 2})})
    busy = Busy(s, 3 * 2 + 1)
    w = worker_for(s, busy)
    with declared(s), running(w):
        wait_for(lambda: w.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "slow")
        wait_for(lambda: w.stats.outcomes.get("archived") == 1, timeout=40, what="the slow batch settled")
        busy.seconds = 0
        send(s, "after")
        wait_for(lambda: w.stats.outcomes.get("archived") == 2, timeout=20, what="the next one")
        archived = get_all(s, topology.archived_queue(s))
    assert w.stats.reconnects == 0, "a busy consumer lost a connection"
    assert w.stats.messages == 2, "the slow one was not delivered again"
    assert sorted(m.body for m in archived) == [b"after", b"slow"]
