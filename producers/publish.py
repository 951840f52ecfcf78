"""Publish file-closed events: the Python API for DAQ code, also behind `rucio-injector publish`.

    from producers.publish import DaqPublisher, file_closed
    with DaqPublisher(settings.broker) as daq:
        daq.publish([file_closed("/data/lst1/run1.fits.fz", site="ORM", instrument="LST1", night="20261124")])

`publish` returns only when the broker has confirmed every event; an unroutable or nacked event
raises PublishFailed naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from injector.checksum import size_and_adler32
from injector.config import Broker
from injector.events import FILE_CLOSED, FileClosed, encode
from injector.transport import Outgoing, Publisher, connection


def file_closed(path: str | os.PathLike[str], *, site: str, instrument: str, size: int | None = None,
                adler32: str | None = None, **fields: Any) -> FileClosed:
    """A file-closed event for a file on local disk; size and adler32 are computed (streaming)
    unless given. Extra fields: run, night, datatype, md5, metadata."""
    abspath = os.path.abspath(path)
    if size is None or adler32 is None:
        size, adler32 = size_and_adler32(abspath)
    return FileClosed.create(site=site, instrument=instrument, path=abspath, size=size, adler32=adler32,
                             **fields)


def outgoing(event: FileClosed, exchange: str) -> Outgoing:
    return Outgoing(exchange, event.routing_key, encode(event),
                    {"schema": FILE_CLOSED, "event-id": str(event.event_id)}, str(event.event_id))


class DaqPublisher:
    """A confirmed publisher of file-closed events to the DAQ exchange."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._conn = connection(broker)
        self._publisher = Publisher(self._conn)

    def publish(self, events: Sequence[FileClosed]) -> None:
        self._publisher.publish([outgoing(e, self._broker.daq_exchange) for e in events])

    def close(self) -> None:
        self._publisher.close()
        self._conn.release()

    def __enter__(self) -> DaqPublisher:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
