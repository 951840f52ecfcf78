"""The STOMP consumer loop on both brokers, without Rucio: ack after effect, NACK → redelivery →
our own dead letter at the delivery limit, reconnect + resubscribe after the broker drops us."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import stomp

from injector.messages import Delivery
from injector.settle import Outcome, Route
from injector.stomp import stomp_worker
from injector.worker import Batching, BatchWorker
from tests.integration.netfault import Proxy
from tests.integration.rabbit import declared, running, unique_settings, wait_for
from tests.integration.test_cleanup_rucio import dead_letters

pytestmark = pytest.mark.integration


@pytest.fixture(params=["rabbitmq", "activemq"])
def broker(request: pytest.FixtureRequest) -> tuple[str, Any]:
    if request.param == "activemq":
        return "activemq", request.getfixturevalue("activemq")
    return "rabbitmq", None


def settings_for(flavour: str, amq: Any) -> Any:
    tag = uuid.uuid4().hex[:8]
    if flavour == "rabbitmq":
        cleanup = {"flavour": "rabbitmq", "stomp_hosts": ["127.0.0.1:61613"], "queue": f"t-{tag}.cleanup",
                   "hermes_destination": f"/topic/t-{tag}.events"}
    else:
        cleanup = {"flavour": "activemq", "stomp_hosts": [f"127.0.0.1:{amq.stomp_port}"], "app": f"app-{tag}",
                   "hermes_destination": f"/topic/VirtualTopic.t-{tag}"}
    cleanup |= {"heartbeat_ms": 1000, "batch_window": 0.05}
    return unique_settings({"streams": []}, cleanup=cleanup, broker={"delivery_limit": 3})


class Recorder:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        self.seen.extend(d.body for d in batch)
        return [Outcome("retry", "failing", None, "rucio-unavailable", "Rucio said 503") if d.body == b"poison"
                else Outcome.done("ok") for d in batch]


def worker_for(s: Any, process: Recorder) -> BatchWorker:
    c = s.cleanup
    queue = c.queue if c.flavour == "rabbitmq" else c.subscription.removeprefix("/queue/")
    w = stomp_worker(c, s.broker, Route(queue, s.broker.dead_letter_exchange, s.broker.delivery_limit), process,
                     Batching(10, 0.05, 50, retry_pause=0.05))
    return w


def send(s: Any, *bodies: str) -> None:
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    conn = stomp.Connection12([(host, int(port))], vhost="/")
    conn.connect("guest", "guest", wait=True)
    for b in bodies:
        conn.send(s.cleanup.hermes_destination, b, headers={"persistent": "true"}, receipt=uuid.uuid4().hex)
    conn.disconnect()  # DISCONNECT with receipt: everything sent before is on the broker


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
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    proxy = Proxy((host, int(port)))
    proxied = s.cleanup.model_copy(update={"stomp_hosts": [f"127.0.0.1:{proxy.port}"]})
    via_proxy = s.model_copy(update={"cleanup": proxied})
    rec = Recorder()
    w = worker_for(via_proxy, rec)
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
