"""Publish file-closed events: the Python API for DAQ code, also behind `rucio-injector publish`.

    from producers.publish import DaqPublisher, file_closed
    with DaqPublisher.of(settings) as daq:
        daq.publish([file_closed("/data/lst1/run1.fits.fz", site="ORM", instrument="LST1", night="20261124")])

Given the streams, the publisher announces each file under its canonical path (`injector.streams.canonical_path`:
symlinks inside the storage root resolved; a file whose real path leaves the root raises PathOutsideRoot).
`publish` returns once the events are in the durable outbox (`producers.outbox`; OutboxFull when it is full, nothing
written): it never waits for the broker. A background drainer (`producers.drainer`) publishes them with confirms,
retrying while the broker is down, refuses or does not confirm; `flush` drains now; leaving the `with` block
(`close`) drains what waits for up to `close_timeout` seconds and leaves the rest in the outbox, which the next
publisher of this outbox (or `rucio-injector publish --flush`) sends. An event the broker answers for (unroutable,
nacked) stays in the outbox and is logged at ERROR, never dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from injector.checksum import size_and_adler32
from injector.config import Broker, OutboxSettings, Settings, Stream
from injector.errors import ConfigError
from injector.events import FILE_CLOSED, FileClosed, decode_file_closed, encode
from injector.messages import Outgoing
from injector.signing import Keyring
from injector.streams import canonical
from injector.topology import Routes
from producers.drainer import RETRYABLE, Drainer
from producers.outbox import Drained, Outbox

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 10.0  # seconds `close` keeps retrying an unavailable broker before leaving the events in the outbox


def file_closed(path: str | os.PathLike[str], *, site: str, instrument: str, size: int | None = None,
                adler32: str | None = None, **fields: Any) -> FileClosed:
    """A file-closed event for a file on local disk; size and adler32 are computed (streaming)
    unless given. Extra fields: run, night, datatype, md5, metadata. A relative path is taken from the
    current directory; DaqPublisher (given the streams) then announces it under its canonical path."""
    abspath = os.path.abspath(path)
    if size is None or adler32 is None:
        size, adler32 = size_and_adler32(abspath)
    return FileClosed.create(site=site, instrument=instrument, path=abspath, size=size, adler32=adler32,
                             **fields)


def outgoing(event: FileClosed, exchange: str, keyring: Keyring | None = None) -> Outgoing:
    """The message of a file-closed event; signed when the keyring has a key to sign with (`injector.signing`)."""
    body = encode(event)
    headers = {"schema": FILE_CLOSED, "event-id": str(event.event_id)}
    if keyring is not None:
        headers.update(keyring.headers(body))
    return Outgoing(exchange, event.routing_key, body, headers, str(event.event_id))


class DaqPublisher:
    """File-closed events to the DAQ exchange through the durable outbox; with `streams`, under canonical paths.
    `background=False`: no drainer thread, only `flush` publishes (the CLI). `routes`: the topology's bindings, needed
    by a stomp:// (ActiveMQ) broker, which has no exchanges; `keyring`: signs each event with its `sign_with` key.
    `DaqPublisher.of(settings)` passes everything."""

    def __init__(self, broker: Broker, streams: Sequence[Stream] = (), outbox: OutboxSettings | None = None, *,
                 routes: Routes | None = None, keyring: Keyring | None = None, background: bool = True,
                 max_wait: float = 30.0, close_timeout: float = CLOSE_TIMEOUT) -> None:
        if broker.transport == "stomp" and routes is None:
            raise ConfigError("a stomp:// (ActiveMQ) broker has no exchanges: the publisher routes by the "
                              "configuration's topology; use DaqPublisher.of(settings)")
        self._broker = broker
        self._streams = streams
        self._keyring = keyring
        self._close_timeout = close_timeout
        self.outbox = Outbox(outbox or OutboxSettings())
        self._drainer = Drainer(self.outbox, broker, routes=routes, max_wait=max_wait)
        if background:
            self._drainer.start()
            self._drainer.kick()  # events a previous process left are sent first

    @classmethod
    def of(cls, settings: Settings, **options: Any) -> DaqPublisher:
        """The publisher a configuration describes: its broker, streams (canonical paths), outbox, topology and
        signing key."""
        options.setdefault("keyring", Keyring.load(settings.signing))
        return cls(settings.broker, settings.streams, settings.outbox, routes=Routes(settings), **options)

    def publish(self, events: Sequence[FileClosed]) -> list[FileClosed]:
        """Write the events to the outbox (one transaction, durable on return) and return them as announced: their
        canonical paths. The broker is not waited for."""
        announced = [canonical(self._streams, e) for e in events]
        self.outbox.put([outgoing(e, self._broker.daq_exchange, self._keyring) for e in announced])
        self._drainer.kick()
        return announced

    def flush(self, timeout: float = 30.0, lock_wait: float | None = None) -> Drained:
        """Publish every waiting event now, retrying for about `timeout` s (0: one attempt; a drain of another
        process is waited for `lock_wait` s, default `timeout`); `left` says how many still wait. Raises the
        broker's error when no attempt could run."""
        return self._drainer.flush(timeout, lock_wait)

    def waiting(self) -> list[FileClosed]:
        """The events of this exchange still in the outbox (oldest first, at most 1000)."""
        return [decode_file_closed(r.message.body) for r in self.outbox.waiting(self._broker.daq_exchange)]

    def depth(self) -> int:
        return self.outbox.depth(self._broker.daq_exchange)

    def close(self) -> None:
        """Stop the drainer, drain what waits for up to close_timeout s; what is left stays in the outbox."""
        self._drainer.stop()
        try:
            if self._close_timeout > 0 and self.depth():
                self.flush(self._close_timeout)
        except RETRYABLE as exc:
            log.warning("broker unavailable at close: %s", exc)
        finally:
            left = self.depth() if self._close_timeout > 0 else 0  # 0: the caller reports what waits
            if left:
                log.warning("%d event(s) kept in the outbox %s: the next publisher of it or `rucio-injector publish "
                            "--flush` sends them", left, self.outbox.path)
            self._drainer.close()
            self.outbox.close()

    def __enter__(self) -> DaqPublisher:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
