"""Files the watcher refuses at the DAQ edge, and the durable record of each (a dead letter of the ingest queue).

A file is refused when its event could never be ingested because of its name alone: a name that is not valid
UTF-8 (`bad-file-name`: the event contract is JSON text), or a path whose DID name Rucio would refuse
(`invalid-name`, decided by `injector.streams.did_name`, the same check ingest applies). Hashing such a file
would be wasted and announcing it would only move the failure downstream, where each `watch --existing`
would add one more dead letter.

Each refused file is logged (the path escaped: `\\xff` for a byte that is not UTF-8), counted in
`rucio_injector_dead_letters{consumer="watch",reason}`, and recorded ONCE in the ingest queue's dead-letter
queue, where `rucio-injector dlq list --reason bad-file-name` shows it. The record's id is a digest of the
stream and the path's bytes: before its first record the watcher reads the ids already there, so restarts
never add a second one. While the broker is down records wait and are retried; the files are never announced.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from injector import deadletter, topology
from injector.config import Broker, Settings, Stream
from injector.errors import Permanent
from injector.messages import Outgoing
from injector.metrics import Metrics
from injector.streams import did_name
from injector.transport import sender_for

log = logging.getLogger(__name__)

BAD_FILE_NAME = "bad-file-name"
SCHEMA = "file-refused/1"
MAX_BACKOFF = 30.0  # seconds between attempts to record while the broker is down


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one file of a stream is not announced."""

    stream: Stream
    path: str  # as os.fsdecode gives it: bytes that are not UTF-8 are lone surrogates
    reason: str
    error: str
    field: str = "path"

    @property
    def raw(self) -> bytes:
        return os.fsencode(self.path)

    @property
    def shown(self) -> str:
        """The path as text that is safe to print: undecodable bytes as \\xNN, control characters escaped."""
        return ascii_escaped(self.raw)

    @property
    def id(self) -> str:
        digest = hashlib.sha1(self.stream.name.encode() + b"\0" + self.raw).hexdigest()
        return digest[:32]


def ascii_escaped(raw: bytes) -> str:
    """Bytes of a path as printable text: printable ASCII kept, everything else escaped like a Python repr."""
    return repr(raw)[2:-1]


def refusal(stream: Stream, path: str) -> Refusal | None:
    """Why the file cannot be announced by its name alone, or None when its name is fine."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = os.fsencode(path[: exc.start])
        return Refusal(stream, path, BAD_FILE_NAME,
                       f"path {ascii_escaped(os.fsencode(path))!r} is not valid UTF-8 (byte "
                       f"{os.fsencode(path[exc.start])[0]:#04x} at byte {len(where)}): the event's path is JSON text")
    try:
        did_name(stream, path)
    except Permanent as exc:
        return Refusal(stream, path, exc.reason, f"{exc} (stream {stream.name!r}, did_name {stream.did_name!r}, "
                                                 f"did_prefix {stream.did_prefix!r})")
    return None


def message(r: Refusal, queue: str, dlq: str) -> Outgoing:
    """The dead letter recording a refusal: a JSON body naming file, field and reason; the dlq-* headers."""
    body = {"schema": SCHEMA, "stream": r.stream.name, "site": r.stream.site, "instrument": r.stream.instrument,
            "path": r.shown, "path_base64": base64.b64encode(r.raw).decode(), "field": r.field,
            "reason": r.reason, "error": r.error}
    hdrs = deadletter.headers({}, reason=r.reason, error=r.error, exchange="", routing_key=queue, queue=queue,
                              attempts=0)
    return Outgoing("", dlq, json.dumps(body).encode(), hdrs, r.id)  # straight into the DLQ


class Refusals:
    """Logs, counts and records refused files, each once (see the module's docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._broker: Broker = settings.broker
        self._queue = settings.ingest.queue
        self._dlq = topology.dead_letters_of(settings, self._queue)
        self._metrics = metrics
        self._seen: set[str] = set()  # reported by this process
        self._recorded: set[str] | None = None  # ids in the DLQ, read before the first record
        self._pending: list[Refusal] = []
        self._next_try = 0.0
        self._failures = 0

    @property
    def pending(self) -> list[Refusal]:
        return list(self._pending)

    def report(self, r: Refusal) -> None:
        if r.id in self._seen:
            return
        self._seen.add(r.id)
        log.error("%s NOT announced (stream %s, %s, field %s): %s; recorded in %s", r.shown, r.stream.name,
                  r.reason, r.field, r.error, self._dlq)
        if self._metrics is not None:
            self._metrics.dead_letters.labels("watch", r.reason).inc()
        self._pending.append(r)

    def flush(self, force: bool = False) -> bool:
        """Record what is pending (one attempt, unless waiting out a backoff); False when some still wait."""
        if not self._pending or (not force and time.monotonic() < self._next_try):
            return not self._pending
        try:
            self._record()
        except Exception as exc:  # the broker down, the topology missing: never the watcher's end
            self._failures += 1
            self._next_try = time.monotonic() + min(2.0 ** self._failures, MAX_BACKOFF)
            log.warning("%d refused file(s) not recorded yet (%s); retrying", len(self._pending), exc)
            return False
        self._failures = 0
        return True

    def _record(self) -> None:
        dlq = self._dlq
        if self._recorded is None:
            from operations.dlq import dlq_for  # listing the DLQ is the dlq tool's job

            self._recorded = {r.id for r in dlq_for(self._settings, dlq).peek(dlq)}
        new = [r for r in self._pending if r.id not in self._recorded]
        if new:
            sender = sender_for(self._broker.model_copy(update={"connect_attempts": 1}),
                                topology.Routes(self._settings))
            try:
                sender.publish([message(r, self._queue, dlq) for r in new])
            finally:
                sender.close()
        for r in self._pending:
            if r.id in self._recorded:
                log.info("%s already recorded in %s (id %s)", r.shown, dlq, r.id)
            else:
                log.info("%s recorded in %s (id %s)", r.shown, dlq, r.id)
        self._recorded.update(r.id for r in new)
        self._pending.clear()
