"""The drain of the outbox to the broker: in the background of a long-running publisher, or now (`flush`).

A drain publishes the waiting events of the configuration's DAQ exchange with confirms (`producers.outbox`). The
background thread drains when kicked (a publish), every POLL seconds (events another process left, parked ones
whose pause is over), and, while the broker is down, refuses or does not confirm, retries with jittered exponential
backoff (tenacity) up to `max_wait` between attempts, until the broker is back or the publisher closes. Nothing is
deleted before the broker confirmed it. Its connection is closed after `idle_close` seconds unused (nothing
services its heartbeats meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence

import tenacity

from injector.config import Broker
from injector.errors import BrokerUnavailable, InvalidEvent, PublishFailed
from injector.events import decode_file_closed
from injector.messages import Outgoing
from injector.topology import Routes
from injector.transport import Sender, sender_for
from producers.outbox import Drained, Outbox, Row

log = logging.getLogger(__name__)

# Broker down, connection lost, confirms missing; the outbox file busy past its timeout: worth another try later.
RETRYABLE = (PublishFailed, BrokerUnavailable, OSError, sqlite3.OperationalError)
POLL = 2.0  # seconds between looks at the outbox when nothing kicks the drainer
LOCK_WAIT = 30.0  # a flush waits this long for another process's drain to finish


class Drainer:
    """Drains one outbox to the broker's DAQ exchange; `start()` runs it in the background."""

    def __init__(self, outbox: Outbox, broker: Broker, *, routes: Routes | None = None, batch: int = 500,
                 max_wait: float = 30.0, idle_close: float = 10.0) -> None:
        self.outbox = outbox
        self._broker = broker.model_copy(update={"connect_attempts": 1})  # the retries here own the backoff
        self._routes = routes
        self._batch = batch
        self._max_wait = max_wait
        self._idle_close = idle_close
        self._busy = threading.Lock()  # one drain at a time on this drainer's connection
        self._sender: Sender | None = None
        self._last_use = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drain(self, everything: bool = False, wait: float = 0.0) -> Drained:
        """One pass: publish what is due (with `everything`, the parked events too); raises what the broker did."""
        with self._busy:
            try:
                done = self.outbox.drain(self._broker.daq_exchange, self._publish, batch=self._batch,
                                         everything=everything, wait=wait, confirmed=announced)
            except BaseException:
                self._disconnect()  # a fresh connection for the next attempt
                raise
            return done

    def flush(self, timeout: float, lock_wait: float | None = None) -> Drained:
        """Drain every waiting event now (parked ones too), retrying with backoff for about `timeout` seconds
        (0: one attempt; another process's drain is waited for `lock_wait` s, default `timeout`); the broker's last
        error is raised when no attempt could run."""
        retrying = self._retrying(tenacity.stop_after_delay(timeout), time.sleep)
        return retrying(self.drain, everything=True, wait=timeout if lock_wait is None else lock_wait)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-drainer", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """New events are waiting: drain now (unless backing off from a broker failure)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the background thread (after the batch it may be publishing); the events stay in the outbox."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        with self._busy:
            self._disconnect()

    def _run(self) -> None:
        retrying = self._retrying(tenacity.stop_when_event_set(self._stop), self._pause)
        while not self._stop.is_set():
            try:
                retrying(self.drain)
            except RETRYABLE:
                pass  # stopped while the broker is down: the events stay in the outbox
            except Exception:  # a bug must not end the drain silently: logged, tried again at the next poll
                log.exception("draining the outbox %s failed", self.outbox.path)
            self._wake.wait(POLL)
            self._wake.clear()
            self._idle()
        with self._busy:
            self._disconnect()

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop ends a backoff at once; a kick does not (no hammering a down broker)

    def _publish(self, messages: Sequence[Outgoing]) -> None:
        if self._sender is None:
            self._sender = sender_for(self._broker, self._routes)
        self._sender.publish(messages)
        self._last_use = time.monotonic()

    def _idle(self) -> None:
        """Close the connection once unused for a while (nothing services its heartbeats meanwhile)."""
        if self._sender is not None and time.monotonic() - self._last_use > self._idle_close:
            with self._busy:
                self._disconnect()

    def _disconnect(self) -> None:
        sender, self._sender = self._sender, None
        with contextlib.suppress(Exception):
            if sender is not None:
                sender.close()

    def _retrying(self, stop: tenacity.stop.stop_base, sleep: Callable[[float], None]) -> tenacity.Retrying:
        """Retry what may pass (RETRYABLE) with jittered exponential backoff, up to `max_wait` apart."""
        return tenacity.Retrying(retry=tenacity.retry_if_exception_type(RETRYABLE), stop=stop, sleep=sleep,
                                 wait=tenacity.wait_random_exponential(multiplier=0.5, max=self._max_wait),
                                 before_sleep=self._log_retry, reraise=True)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        with contextlib.suppress(sqlite3.Error):
            waiting = self.outbox.depth(self._broker.daq_exchange)
            log.warning("broker unavailable (%s): %d event(s) kept in the outbox %s, retry %d in %.1f s", exc,
                        waiting, self.outbox.path, state.attempt_number, wait)


def announced(rows: list[Row]) -> None:
    """One line per event the broker confirmed: path, size, adler32, and its event_id as a context field."""
    for r in rows:
        mid = r.message.message_id
        try:
            e = decode_file_closed(r.message.body)
        except InvalidEvent:
            log.info("announced message %s", mid, extra={"event_id": mid})
            continue
        log.info("announced %s size=%d adler32=%s", e.path, e.size, e.adler32, extra={"event_id": str(e.event_id)})
