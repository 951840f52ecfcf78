"""Long-running consumer services: each composes a handler with the broker transport."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from consumers.cleanup import TransferFailures, cleanup
from consumers.ingest import DatasetMemo, ingest
from injector.config import Settings
from injector.errors import ConfigError, InvalidEvent
from injector.events import FileClosed, RucioEvent, decode_file_closed, decode_rucio_event
from injector.gateway import ClientGateway, RucioGateway
from injector.messages import Delivery
from injector.metrics import Metrics, serve
from injector.settle import Outcome, Route
from injector.stomp import stomp_worker
from injector.worker import Batching, BatchWorker, amqp_worker

log = logging.getLogger(__name__)


def decode_all(deliveries: Sequence[Delivery]) -> list[FileClosed | InvalidEvent]:
    out: list[FileClosed | InvalidEvent] = []
    for d in deliveries:
        try:
            out.append(decode_file_closed(d.body))
        except InvalidEvent as exc:
            out.append(exc)
    return out


def ingest_worker(settings: Settings, rucio: RucioGateway | None = None) -> BatchWorker:
    """The ingest consumer: file-closed events from the ingest queue, in batches, into Rucio."""
    metrics = Metrics("ingest")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    memo = DatasetMemo()

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return ingest(decode_all(batch), gateway, settings, memo)

    route = Route(settings.ingest.queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    batching = Batching(settings.ingest.batch_size, settings.ingest.batch_window, settings.ingest.prefetch)
    return amqp_worker(settings.broker, route, process, batching, metrics)


def decode_rucio_events(deliveries: Sequence[Delivery]) -> list[RucioEvent | InvalidEvent]:
    out: list[RucioEvent | InvalidEvent] = []
    for d in deliveries:
        try:
            out.append(decode_rucio_event(d.body))
        except InvalidEvent as exc:
            out.append(exc)
    return out


def cleanup_worker(settings: Settings, rucio: RucioGateway | None = None) -> BatchWorker:
    """The cleanup consumer: Rucio's events (hermes, over STOMP) → verified source release → file-archived."""
    metrics = Metrics("cleanup")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    failures = TransferFailures()
    c = settings.cleanup

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return cleanup(decode_rucio_events(batch), gateway, settings, failures)

    queue = c.queue if c.flavour == "rabbitmq" else c.subscription.removeprefix("/queue/")
    route = Route(queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    return stomp_worker(c, settings.broker, route, process, Batching(c.batch_size, c.batch_window, c.prefetch),
                        metrics)


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
