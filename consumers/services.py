"""Long-running consumer services: each composes a handler with the broker transport."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from consumers.cleanup import TransferFailures, cleanup
from consumers.ingest import DatasetMemo, ingest
from injector.config import Settings
from injector.errors import ConfigError, InvalidEvent
from injector.events import decode_file_closed, decode_rucio_event
from injector.gateway import ClientGateway, RucioGateway
from injector.messages import Delivery
from injector.metrics import Metrics, serve
from injector.settle import Outcome, Route
from injector.worker import Batching, BatchWorker, Connect

log = logging.getLogger(__name__)
T = TypeVar("T")


def decode_each(deliveries: Sequence[Delivery], decode: Callable[[bytes], T]) -> list[T | InvalidEvent]:
    """Every delivery's event, or the InvalidEvent saying why it is not one (the handler dead-letters it)."""
    out: list[T | InvalidEvent] = []
    for d in deliveries:
        try:
            out.append(decode(d.body))
        except InvalidEvent as exc:
            out.append(exc)
    return out


def ingest_worker(settings: Settings, rucio: RucioGateway | None = None) -> BatchWorker:
    """The ingest consumer: file-closed events from the ingest queue, in batches, into Rucio."""
    metrics = Metrics("ingest")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    memo = DatasetMemo()

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return ingest(decode_each(batch, decode_file_closed), gateway, settings, memo)

    i = settings.ingest
    route = Route(i.queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    batching = Batching(i.batch_size, i.batch_window, i.prefetch, outage_hold=settings.broker.outage_hold)
    return BatchWorker(_amqp(settings, i.queue, i.prefetch), route, process, batching, metrics, gateway.breaker)


def cleanup_worker(settings: Settings, rucio: RucioGateway | None = None) -> BatchWorker:
    """The cleanup consumer: Rucio's events (hermes, over STOMP) → verified source release → file-archived."""
    metrics = Metrics("cleanup")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    failures = TransferFailures()
    c = settings.cleanup

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return cleanup(decode_each(batch, decode_rucio_event), gateway, settings, failures)

    route = Route(c.consumer_queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    batching = Batching(c.batch_size, c.batch_window, c.prefetch, outage_hold=settings.broker.outage_hold)
    return BatchWorker(cleanup_link(settings), route, process, batching, metrics, gateway.breaker)


def cleanup_link(settings: Settings) -> Connect:
    """RabbitMQ: the cleanup queue hermes' STOMP topic feeds (through amq.topic), read over AMQP like ingest.
    ActiveMQ: its virtual-topic consumer queue over STOMP."""
    c = settings.cleanup
    if c.flavour == "rabbitmq":
        return _amqp(settings, c.queue, c.prefetch)
    from injector.stomp import stomp_link

    return stomp_link(c, settings.broker)


def _amqp(settings: Settings, queue: str, prefetch: int) -> Connect:
    from injector.transport import amqp_link

    return amqp_link(settings.broker, queue, prefetch)


def run_cleanup(settings: Settings, stop: threading.Event, metrics_port: int | None = None) -> None:
    worker = cleanup_worker(settings)
    _serve_metrics(worker.metrics, settings.metrics.host,
                   settings.metrics.cleanup_port if metrics_port is None else metrics_port)
    worker.run(stop)


def run_ingest(settings: Settings, stop: threading.Event, metrics_port: int | None = None) -> None:
    worker = ingest_worker(settings)
    _serve_metrics(worker.metrics, settings.metrics.host,
                   settings.metrics.ingest_port if metrics_port is None else metrics_port)
    worker.run(stop)


def _serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    if port:
        try:
            serve(metrics, port, host)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc} (set --metrics-port, 0 = off)") from None
