"""Prometheus metrics and health endpoints for the long-running verbs.

`Metrics` owns one registry; `serve()` exposes on one port:
  * `/metrics` (Prometheus text format);
  * `/healthz`, liveness: 200 while the consumer loop is alive and connected to the broker, 503 otherwise
    (restarting the process may help). A Rucio outage does not fail it (a restart cannot help): the body
    then says `ok; rucio unavailable since …`;
  * `/readyz`, readiness: 200 only when the process is live AND Rucio answers; 503 with the reason otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from injector import clock
from injector.breaker import Breaker
from injector.settle import Outcome

log = logging.getLogger(__name__)

STALL_SECONDS = 60.0  # a loop silent for longer than this is reported unhealthy


class Metrics:
    def __init__(self, consumer: str, stall_seconds: float = STALL_SECONDS) -> None:
        self.consumer = consumer
        self.stall_seconds = stall_seconds  # a periodic verb (reconcile --every) is silent between passes
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("rucio_injector_events", "Messages settled, by outcome", ["consumer", "kind", "outcome"],
                              registry=r)
        self.dead_letters = Counter("rucio_injector_dead_letters", "Messages dead-lettered, by reason",
                                    ["consumer", "reason"], registry=r)
        self.batch_size = Histogram("rucio_injector_batch_size", "Messages per batch", ["consumer"], registry=r,
                                    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000))
        self.batch_seconds = Histogram("rucio_injector_batch_seconds", "Time to process one batch", ["consumer"],
                                       registry=r)
        self.rucio_seconds = Histogram("rucio_injector_rucio_call_seconds", "Rucio call duration",
                                       ["operation", "outcome"], registry=r,
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.retries = Counter("rucio_injector_retries", "Retried Rucio calls and requeued messages",
                               ["consumer", "what"], registry=r)
        self.reconnects = Counter("rucio_injector_reconnects", "Broker reconnects", ["consumer"], registry=r)
        self.oldest = Gauge("rucio_injector_oldest_unprocessed_seconds",
                            "Age of the oldest message received but not yet settled", ["consumer"], registry=r)
        self.rucio_available = Gauge("rucio_injector_rucio_available", "1 while Rucio answers, 0 during an outage",
                                     registry=r)
        self.rucio_down = Gauge("rucio_injector_rucio_unavailable_seconds", "How long the current Rucio outage has "
                                "lasted (0 when Rucio answers)", registry=r)
        self.outages = Counter("rucio_injector_rucio_outages", "Rucio outages seen (breaker openings)", registry=r)
        self.outage_seconds = Counter("rucio_injector_rucio_outage_seconds", "Seconds of Rucio outages that "
                                      "ended", registry=r)
        self.clamped = Gauge("rucio_injector_future_timestamps_clamped", "Timestamps further ahead of this host's "
                             "clock than injector.clock.SKEW, clamped to the receive time (since start)", registry=r)
        self.clamped.set_function(lambda: float(clock.clamped()))
        self._breaker: Breaker | None = None
        self.rucio_available.set_function(lambda: 0.0 if self._breaker and self._breaker.open else 1.0)
        self.rucio_down.set_function(lambda: self._breaker.down_for() if self._breaker else 0.0)
        self._alive = time.monotonic()
        self._connected = False
        self._oldest_fn: Callable[[], float] = lambda: 0.0
        self.oldest.labels(consumer).set_function(lambda: self._oldest_fn())

    # hooks called by the consumer loops
    def observe_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        c = self.consumer
        self.batch_size.labels(c).observe(len(outcomes))
        self.batch_seconds.labels(c).observe(seconds)
        for o in outcomes:
            self.events.labels(c, o.kind, o.label).inc()
            if o.kind == "dead-letter":
                self.dead_letters.labels(c, o.reason or o.label).inc()
            elif o.kind == "retry":
                self.retries.labels(c, "requeue").inc()

    def observe_rucio(self, operation: str, seconds: float, outcome: str) -> None:
        self.rucio_seconds.labels(operation, outcome).observe(seconds)
        if outcome != "ok":
            self.retries.labels(self.consumer, f"rucio:{operation}").inc()

    def reconnected(self) -> None:
        self.reconnects.labels(self.consumer).inc()

    def heartbeat(self, connected: bool = True) -> None:
        self._alive = time.monotonic()
        self._connected = connected

    def track_oldest(self, fn: Callable[[], float]) -> None:
        self._oldest_fn = fn

    def track_outbox(self, depth: Callable[[], float]) -> None:
        """Export the DAQ outbox's depth (`watch`): events written, not yet confirmed by the broker."""
        gauge = Gauge("rucio_injector_outbox_events", "File-closed events in the DAQ outbox, waiting for the "
                      "broker's publisher confirm", registry=self.registry)
        gauge.set_function(depth)

    def track_breaker(self, breaker: Breaker) -> None:
        """Export the process's Rucio breaker (availability, outage count and seconds)."""
        self._breaker = breaker
        self.outages.inc(0)
        breaker.listeners.append(self._breaker_changed)

    def _breaker_changed(self, opened: bool, lasted: float) -> None:
        if opened:
            self.outages.inc()
        else:
            self.outage_seconds.inc(lasted)

    def rucio(self) -> str:
        """`available`, or since when and why not."""
        b = self._breaker
        if b is None or not b.open or b.since is None:
            return "available"
        return f"unavailable since {b.since:%Y-%m-%dT%H:%M:%SZ} ({b.down_for():.0f} s): {b.reason}"

    def health(self) -> tuple[bool, str]:
        """Liveness: is the loop alive and connected? A Rucio outage is reported, not failed."""
        silent = time.monotonic() - self._alive
        if not self._connected:
            return False, "not connected to the broker"
        if silent > self.stall_seconds:
            return False, f"consumer loop silent for {silent:.0f}s"
        rucio = self.rucio()
        return True, "ok" if rucio == "available" else f"ok; rucio {rucio}; waiting for it (no dead letters)"

    def ready(self) -> tuple[bool, str]:
        """Readiness: live, and Rucio answers."""
        live, why = self.health()
        if not live:
            return False, why
        rucio = self.rucio()
        return (True, "ready") if rucio == "available" else (False, f"rucio {rucio}")


def serve(metrics: Metrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start /metrics and /healthz on a daemon thread; returns the server (call shutdown() to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/metrics"):
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path.startswith(("/healthz", "/readyz")):
                ok, why = metrics.health() if self.path.startswith("/healthz") else metrics.ready()
                self._reply(200 if ok else 503, (why + "\n").encode(), "text/plain")
            else:
                self._reply(404, b"try /metrics, /healthz or /readyz\n", "text/plain")

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, server.server_address[1])
    return server
