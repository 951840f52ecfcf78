"""Publish file-closed events: the Python API for DAQ code, also behind `rucio-injector publish`.

    from producers.publish import DaqPublisher, file_closed
    with DaqPublisher(settings.broker, settings.streams) as daq:
        daq.publish([file_closed("/data/lst1/run1.fits.fz", site="ORM", instrument="LST1", night="20261124")])

Given the streams, the publisher announces each file under its canonical path (`injector.streams.canonical_path`:
symlinks inside the storage root resolved; a file whose real path leaves the root raises PathOutsideRoot).
`publish` returns only when the broker has confirmed every event; an unroutable or nacked event
raises PublishFailed naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from injector.checksum import size_and_adler32
from injector.config import Broker, Stream
from injector.events import FILE_CLOSED, FileClosed, encode
from injector.messages import Outgoing
from injector.streams import canonical
from injector.transport.amqp import Publisher, connection


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


def outgoing(event: FileClosed, exchange: str) -> Outgoing:
    return Outgoing(exchange, event.routing_key, encode(event),
                    {"schema": FILE_CLOSED, "event-id": str(event.event_id)}, str(event.event_id))


class DaqPublisher:
    """A confirmed publisher of file-closed events to the DAQ exchange; with `streams`, under canonical paths."""

    def __init__(self, broker: Broker, streams: Sequence[Stream] = ()) -> None:
        self._broker = broker
        self._streams = streams
        self._conn = connection(broker)
        self._publisher = Publisher(self._conn)

    def publish(self, events: Sequence[FileClosed]) -> list[FileClosed]:
        """Publish (confirmed) and return the events as announced: their canonical paths."""
        announced = [canonical(self._streams, e) for e in events]
        self._publisher.publish([outgoing(e, self._broker.daq_exchange) for e in announced])
        return announced

    def close(self) -> None:
        self._publisher.close()
        self._conn.release()

    def __enter__(self) -> DaqPublisher:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
