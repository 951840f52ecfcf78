"""Long-running consumer services: each composes a handler with a broker transport plug-in (injector.transport):
ingest speaks the DAQ broker's protocol ([broker] urls: AMQP, or STOMP on an ActiveMQ-only site); cleanup reads
RabbitMQ over AMQP, ActiveMQ over STOMP."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from consumers.cleanup import cleanup
from consumers.ingest import DatasetMemo, ingest
from injector import preflight
from injector.config import Settings
from injector.errors import ConfigError, Permanent, RucioDown, Transient
from injector.events import FileClosed, RucioEvent, decode_file_closed, decode_rucio_event
from injector.gateway import ClientGateway, RucioGateway, RucioPreflight
from injector.messages import Delivery
from injector.metrics import Metrics, serve
from injector.settle import Outcome, Route
from injector.signing import Keyring
from injector.transport import Connect, plugin
from injector.worker import Batching, BatchWorker

log = logging.getLogger(__name__)
T = TypeVar("T")
STARTUP_PAUSE = 10.0  # seconds between start-up checks while Rucio does not answer


def decode_each(deliveries: Sequence[Delivery], decode: Callable[[Delivery], T]) -> list[T | Permanent]:
    """Every delivery's event, or the Permanent error saying why it is not one we take (the handler dead-letters
    it): not an event of its contract (InvalidEvent), or not signed as it must be (BadSignature)."""
    out: list[T | Permanent] = []
    for d in deliveries:
        try:
            out.append(decode(d))
        except Permanent as exc:
            out.append(exc)
    return out


def file_closed_of(settings: Settings, keyring: Keyring) -> Callable[[Delivery], FileClosed]:
    """A delivery's file-closed event, its signature checked (`injector.signing`)."""
    def decode(d: Delivery) -> FileClosed:
        event = decode_file_closed(d.body)
        keyring.check(event, d.body, d.headers, settings.streams)
        return event

    return decode


def rucio_event_of(d: Delivery) -> RucioEvent:
    return decode_rucio_event(d.body)


def ingest_worker(settings: Settings, rucio: RucioGateway | None = None, metrics: Metrics | None = None,
                  keyring: Keyring | None = None) -> BatchWorker:
    """The ingest consumer: file-closed events from the ingest queue, their signatures checked, in batches, into
    Rucio. The keyring is read from [signing] unless given."""
    metrics = metrics or Metrics("ingest")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    memo = DatasetMemo()
    decode = file_closed_of(settings, keyring if keyring is not None else Keyring.load(settings.signing))

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return ingest(decode_each(batch, decode), gateway, settings, memo)

    i = settings.ingest
    route = Route(i.queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    batching = Batching(i.batch_size, i.batch_window, i.prefetch, outage_hold=settings.broker.outage_hold)
    connect = plugin(settings.broker.transport).link(settings, i.queue, i.prefetch)
    return BatchWorker(connect, route, process, batching, metrics, gateway.breaker)


def cleanup_worker(settings: Settings, rucio: RucioGateway | None = None, metrics: Metrics | None = None
                   ) -> BatchWorker:
    """The cleanup consumer: Rucio's events (hermes, over STOMP) → verified source release → file-archived."""
    metrics = metrics or Metrics("cleanup")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    c = settings.cleanup

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return cleanup(decode_each(batch, rucio_event_of), gateway, settings)

    route = Route(c.consumer_queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    batching = Batching(c.batch_size, c.batch_window, c.prefetch, outage_hold=settings.broker.outage_hold)
    return BatchWorker(cleanup_link(settings), route, process, batching, metrics, gateway.breaker)


def cleanup_link(settings: Settings) -> Connect:
    """RabbitMQ: the cleanup queue hermes' STOMP topic feeds (through amq.topic), read over AMQP like ingest.
    ActiveMQ: its virtual-topic consumer queue on hermes' broker, over STOMP."""
    c = settings.cleanup
    if c.flavour == "rabbitmq":
        return plugin("amqp").link(settings, c.queue, c.prefetch)
    return plugin("stomp").link(settings, c.consumer_queue, c.prefetch, at=c.server)


def run_cleanup(settings: Settings, stop: threading.Event, metrics_port: int | None = None) -> None:
    _run(settings, "cleanup", cleanup_worker, settings.metrics.cleanup_port if metrics_port is None else metrics_port,
         stop)


def run_ingest(settings: Settings, stop: threading.Event, metrics_port: int | None = None) -> None:
    _run(settings, "ingest", ingest_worker, settings.metrics.ingest_port if metrics_port is None else metrics_port,
         stop)


def _run(settings: Settings, verb: preflight.Verb,
         build: Callable[[Settings, RucioGateway | None, Metrics | None], BatchWorker], port: int,
         stop: threading.Event) -> None:
    """Serve metrics, check the streams against Rucio (waiting out an outage), then consume until `stop`."""
    metrics = Metrics(verb)
    gateway = ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    worker = build(settings, gateway, metrics)
    serve_metrics(metrics, settings.metrics.host, port)
    if checked(settings, verb, stop, gateway):
        worker.run(stop)


def checked(settings: Settings, verb: preflight.Verb, stop: threading.Event, rucio: RucioPreflight,
            pause: float = STARTUP_PAUSE) -> bool:
    """The start-up checks (ConfigError naming each problem). A Rucio outage is waited out through the breaker
    (probing with backoff), a read Rucio fails for now is asked again after `pause`. False: stopped meanwhile."""
    while not stop.is_set():
        try:
            preflight.enforce(preflight.check(settings, rucio, verb), verb)
            return True
        except RucioDown:
            log.warning("%s start-up check: Rucio does not answer; waiting for it", verb)
            rucio.breaker.wait(stop)
        except Transient as exc:
            log.warning("%s start-up check: %s; asking again in %.0f s", verb, exc, pause)
            stop.wait(pause)
    return False


def serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    if port:
        try:
            serve(metrics, port, host)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc} (set --metrics-port, 0 = off)") from None
