"""Long-running consumer services: each composes a handler with the broker transport."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from consumers.cleanup import TransferFailures, cleanup
from consumers.ingest import DatasetMemo, ingest
from injector import preflight
from injector.config import Settings
from injector.errors import ConfigError, InvalidEvent, RucioUnavailable
from injector.events import decode_file_closed, decode_rucio_event
from injector.gateway import ClientGateway, RucioGateway, RucioPreflight
from injector.messages import Delivery
from injector.metrics import Metrics, serve
from injector.settle import Outcome, Route
from injector.stomp import stomp_worker
from injector.worker import Batching, BatchWorker, amqp_worker

log = logging.getLogger(__name__)
T = TypeVar("T")
STARTUP_PAUSE = 10.0  # seconds between start-up checks while Rucio does not answer


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

    route = Route(settings.ingest.queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    batching = Batching(settings.ingest.batch_size, settings.ingest.batch_window, settings.ingest.prefetch)
    return amqp_worker(settings.broker, route, process, batching, metrics)


def cleanup_worker(settings: Settings, rucio: RucioGateway | None = None) -> BatchWorker:
    """The cleanup consumer: Rucio's events (hermes, over STOMP) → verified source release → file-archived."""
    metrics = Metrics("cleanup")
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio, observe=metrics.observe_rucio)
    failures = TransferFailures()
    c = settings.cleanup

    def process(batch: list[Delivery]) -> Sequence[Outcome]:
        return cleanup(decode_each(batch, decode_rucio_event), gateway, settings, failures)

    route = Route(c.consumer_queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    return stomp_worker(c, settings.broker, route, process, Batching(c.batch_size, c.batch_window, c.prefetch),
                        metrics)


def run_cleanup(settings: Settings, stop: threading.Event, metrics_port: int | None = None) -> None:
    worker = cleanup_worker(settings)
    _serve_metrics(worker.metrics, settings.metrics.host,
                   settings.metrics.cleanup_port if metrics_port is None else metrics_port)
    if checked(settings, "cleanup", stop):
        worker.run(stop)


def run_ingest(settings: Settings, stop: threading.Event, metrics_port: int | None = None) -> None:
    worker = ingest_worker(settings)
    _serve_metrics(worker.metrics, settings.metrics.host,
                   settings.metrics.ingest_port if metrics_port is None else metrics_port)
    if checked(settings, "ingest", stop):
        worker.run(stop)


def checked(settings: Settings, verb: preflight.Verb, stop: threading.Event, rucio: RucioPreflight | None = None,
            pause: float = STARTUP_PAUSE) -> bool:
    """The start-up checks (ConfigError naming each problem); a Rucio outage is waited out. False: stopped."""
    gateway = rucio if rucio is not None else ClientGateway(settings.rucio)
    while not stop.is_set():
        try:
            preflight.enforce(preflight.check(settings, gateway, verb), verb)
            return True
        except RucioUnavailable as exc:
            log.warning("%s start-up check: Rucio does not answer (%s); asking again in %.0f s", verb, exc, pause)
            stop.wait(pause)
    return False


def _serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    if port:
        try:
            serve(metrics, port, host)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc} (set --metrics-port, 0 = off)") from None
