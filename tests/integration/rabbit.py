"""Helpers for tests on the real brokers: unique topology per test, queue inspection. RabbitMQ by default;
`activemq_site(port)` gives the sections of an ActiveMQ-only site (every queue on ActiveMQ, spoken to over STOMP)."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kombu

from consumers.services import ingest_worker
from injector import topology
from injector.config import Settings, parse
from injector.events import FileClosed
from injector.worker import BatchWorker
from producers.publish import DaqPublisher

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmqctl(*args: str) -> None:
    """The machine's RabbitMQ's own control tool (users, permissions, the app itself); fails on its error."""
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def unique_settings(base: dict[str, Any], **sections: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    data = dict(base)
    data["broker"] = {"urls": [AMQP_URL], "daq_exchange": f"t-{tag}.daq", "dead_letter_exchange": f"t-{tag}.dlx",
                      **sections.pop("broker", {})}
    data["ingest"] = {"queue": f"t-{tag}.ingest", **sections.pop("ingest", {})}
    # Nothing shared between tests (or test sessions): the cleanup queue and hermes topic are unique too.
    data["cleanup"] = {"queue": f"t-{tag}.cleanup", "hermes_destination": f"/topic/t-{tag}.rucio.events",
                       **sections.pop("cleanup", {})}
    data.update(sections)
    return parse(data)


def activemq_site(port: int) -> dict[str, Any]:
    """Sections for unique_settings: the DAQ broker and hermes' broker are the ActiveMQ on `port`."""
    tag = uuid.uuid4().hex[:8]
    return {"broker": {"urls": [f"stomp://guest:guest@127.0.0.1:{port}"]},
            "cleanup": {"flavour": "activemq", "stomp_hosts": [f"127.0.0.1:{port}"], "app": f"app-{tag}",
                        "hermes_destination": f"/topic/VirtualTopic.t-{tag}"}}


def config_toml(s: Settings) -> str:
    """The [broker] (and, on ActiveMQ, [cleanup]) sections of a config file for `s`."""
    b, c = s.broker, s.cleanup
    text = (f'[broker]\nurls = ["{b.urls[0]}"]\ndaq_exchange = "{b.daq_exchange}"\n'
            f'dead_letter_exchange = "{b.dead_letter_exchange}"\ndelivery_limit = {b.delivery_limit}\n')
    if c.flavour == "activemq":
        text += (f'[cleanup]\nflavour = "activemq"\nstomp_hosts = ["{c.stomp_hosts[0]}"]\napp = "{c.app}"\n'
                 f'hermes_destination = "{c.hermes_destination}"\n')
    return text


def dead_letters(settings: Settings, queue: str | None = None) -> list[Any]:
    """The dead letters of a work queue (default: ingest's), peeked, wherever they live."""
    from operations.dlq import dlq_for

    dlq = topology.dead_letters_of(settings, queue or settings.ingest.queue)
    return dlq_for(settings, dlq).peek(dlq)


def taken(settings: Settings, queue: str) -> list[bytes]:
    """The bodies of every message in a queue, taken off it (acked), wherever it lives."""
    if settings.broker.transport == "stomp":
        from operations.dlq import ActiveMqDlq

        amq = ActiveMqDlq(settings.broker.stomp)
        bodies = [r.body for r in amq.peek(queue)]
        amq.purge(queue)
        return bodies
    return [m.body for m in get_all(settings, queue)]


def waiting(settings: Settings, queue: str) -> int:
    """Messages in a queue nobody has acked (RabbitMQ: ready; ActiveMQ: browsed)."""
    if settings.broker.transport == "stomp":
        from operations.dlq import ActiveMqDlq

        return ActiveMqDlq(settings.broker.stomp).depth(queue)
    return depth(settings, queue)


@contextmanager
def declared(settings: Settings) -> Iterator[Settings]:
    """Apply the topology, yield, then delete every queue and exchange it made. ActiveMQ makes queues on first use:
    what its queues still hold is purged at the end."""
    if settings.broker.transport == "stomp":
        try:
            yield settings
        finally:
            from operations.dlq import ActiveMqDlq

            q = settings.ingest.queue
            for name in (q, topology.dead_letters_of(settings, q), topology.archived_queue(settings)):
                ActiveMqDlq(settings.broker.stomp).purge(name)
        return
    decl = topology.declare(settings)
    with kombu.Connection(settings.broker.urls[0]) as conn:  # no heartbeat: idle during the test
        topology.apply(conn, decl)
    try:
        yield settings
    finally:
        with kombu.Connection(settings.broker.urls[0]) as conn:
            topology.remove(conn, decl)


def get_all(settings: Settings, queue: str) -> list[Any]:
    """Take every ready message off a queue (basic_get, acked)."""
    out = []
    with kombu.Connection(settings.broker.urls[0]) as conn:
        ch = conn.channel()
        while (m := ch.basic_get(queue)) is not None:
            out.append(m)
            ch.basic_ack(m.delivery_tag)
    return out


def depth(settings: Settings, queue: str) -> int:
    with kombu.Connection(settings.broker.urls[0]) as conn:
        return conn.channel().queue_declare(queue, passive=True).message_count


def daq_publisher(settings: Settings) -> DaqPublisher:
    """The DAQ's publisher for a test's settings, on either broker (the paths are published as given)."""
    return DaqPublisher(settings.broker, outbox=settings.outbox, routes=topology.Routes(settings))


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def running(*workers: BatchWorker) -> Iterator[threading.Event]:
    """The workers on threads until the block ends (or the yielded event is set), as `ingest`/`cleanup` run them.
    A worker that raised instead of returning fails the test (an in-process exit code), as does one still running
    30 s after the stop signal."""
    stop = threading.Event()
    raised: list[BaseException] = []

    def run(w: BatchWorker) -> None:
        try:
            w.run(stop)
        except BaseException as exc:
            raised.append(exc)
            raise

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        yield stop
    finally:
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "worker did not stop within 30 s of the stop signal"
    assert not raised, f"a worker raised instead of returning: {raised[0]!r}"


def ingested(settings: Settings, events: list[FileClosed], rucio: Any = None) -> None:
    """Publish file-closed events as the DAQ does and run one ingest consumer until it took them all."""
    with daq_publisher(settings) as daq:
        daq.publish(events)
    worker = ingest_worker(settings, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == len(events), timeout=60, what="ingest")
