"""The DAQ side's durable outbox: file-closed events kept on local disk until the broker confirmed them.

One SQLite file in WAL mode with `synchronous=FULL`: a batch of events is one transaction, on disk before `put`
returns, so a crash (kill -9, power) of the publishing process after that loses none. A drain publishes the
oldest events first (by insertion id) and deletes each only after the broker's publisher confirm; a crash between
the confirm and the delete sends that event again on the next drain, a duplicate with the same event_id (the
message id), which ingest's idempotence makes harmless.

Several processes may share one file (`watch`, `publish`, DAQ code): SQLite's locks (busy_timeout) order the
writes, and one drain at a time holds `<file>.lock` (flock, released by the kernel when its holder dies), so two
drains never publish the same rows at once. Rows are drained per exchange: a file holding another
configuration's events never sends them to this one's exchange.

Bounded: `put` refuses a batch that would take the outbox past `max_events` (OutboxFull, nothing written).
An event the broker answers for (unroutable: no queue bound for its routing key; nacked) stays, is reported, and is
parked: the next drains pass it by for PARK seconds, so it never holds back the events behind it; a flush
(`publish --flush`) tries every event again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from injector.config import OutboxSettings
from injector.errors import ConfigError, OutboxFull, PublishFailed
from injector.messages import Outgoing

log = logging.getLogger(__name__)

PARK = 30.0  # seconds an event the broker answered for (unroutable, nacked) is passed by, before it is tried again
BUSY_TIMEOUT_MS = 30_000  # another process's write transaction: wait this long before "database is locked"
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    message_id TEXT,
    content_type TEXT NOT NULL,
    queued_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_exchange ON outbox (exchange, id);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One waiting event: its outbox id and the message to publish."""

    id: int
    message: Outgoing
    error: str | None = None


@dataclass(slots=True)
class Drained:
    """What one drain did: sent (confirmed and deleted), parked (the broker answered for them: id → why), left
    (still waiting for this exchange afterwards); busy when another drain held the outbox."""

    sent: int = 0
    parked: dict[int, str] = field(default_factory=dict)
    left: int = 0
    busy: bool = False


class Outbox:
    """The outbox file (see the module's docstring). Safe to share between the threads of a process."""

    def __init__(self, settings: OutboxSettings) -> None:
        self.path = settings.file
        self.max_events = settings.max_events
        self._lock = threading.Lock()  # one statement at a time on the shared connection
        self._drain_lock = threading.Lock()  # one drain at a time in this process (flock: across processes)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the outbox {self.path}: {exc} ([outbox] path)") from exc

    def put(self, messages: Sequence[Outgoing]) -> None:
        """Write all the messages in one transaction, durable when this returns; OutboxFull (nothing written) when
        they would not fit."""
        if not messages:
            return
        now = time.time()
        rows = [(m.exchange, m.routing_key, m.body, json.dumps(m.headers), m.message_id, m.content_type, now)
                for m in messages]
        with self._transaction() as db:
            waiting = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            if waiting + len(rows) > self.max_events:
                raise OutboxFull(
                    f"outbox {self.path} is full: {waiting} event(s) wait for the broker (max_events "
                    f"{self.max_events}), {len(rows)} more refused and not written: bring the broker back (the "
                    "outbox then drains) or run `rucio-injector publish --flush`; [outbox] max_events raises the bound")
            db.executemany("INSERT INTO outbox (exchange, routing_key, body, headers, message_id, content_type, "
                           "queued_at) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def depth(self, exchange: str | None = None) -> int:
        """Events waiting (for one exchange, or all)."""
        args: tuple[str, ...]
        sql, args = "SELECT count(*) FROM outbox", ()
        if exchange is not None:
            sql, args = sql + " WHERE exchange = ?", (exchange,)
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    def waiting(self, exchange: str, limit: int = 1000) -> list[Row]:
        """The oldest waiting events of an exchange, parked ones included."""
        return self._head(exchange, 0, limit, None)

    def drain(self, exchange: str, publish: Callable[[Sequence[Outgoing]], object], *, batch: int = 500,
              everything: bool = False, wait: float = 0.0,
              confirmed: Callable[[list[Row]], object] = lambda rows: None) -> Drained:
        """Publish the exchange's waiting events oldest first, `batch` at a time, deleting each batch once
        `publish` returned (it returns after the broker's confirms); `confirmed` is told each batch. Parked events
        are passed by unless `everything`. A PublishFailed naming messages parks those and goes on; any other
        failure leaves the batch in place and is raised. Waits up to `wait` s for another drain to finish."""
        with self._draining(wait) as mine:
            if not mine:
                return Drained(busy=True, left=self.depth(exchange))
            done, after = Drained(), 0
            while rows := self._head(exchange, after, batch, None if everything else time.time()):
                after = rows[-1].id
                try:
                    publish([r.message for r in rows])
                except PublishFailed as exc:
                    if not exc.failed:
                        raise
                    confirmed(self._answered(rows, exc.failed, done))
                    continue
                self.delete([r.id for r in rows])
                done.sent += len(rows)
                confirmed(rows)
            done.left = self.depth(exchange)
            return done

    def _answered(self, rows: list[Row], failed: dict[str, str], done: Drained) -> list[Row]:
        """The broker confirmed some of a batch and answered for the rest: delete the first (returned), park the
        others."""
        bad = [r for r in rows if (r.message.message_id or "?") in failed]
        good = [r for r in rows if (r.message.message_id or "?") not in failed]
        self.delete([r.id for r in good])
        done.sent += len(good)
        until = time.time() + PARK
        with self._transaction() as db:
            for r in bad:
                why = failed[r.message.message_id or "?"]
                db.execute("UPDATE outbox SET not_before = ?, error = ? WHERE id = ?", (until, why, r.id))
                done.parked[r.id] = why
        for r in bad:
            log.error("event %s NOT accepted by the broker (%s): kept in the outbox %s and retried; "
                      "`rucio-injector broker setup` declares a missing binding", r.message.message_id,
                      done.parked[r.id], self.path, extra={"event_id": r.message.message_id})
        return good

    def delete(self, ids: Sequence[int]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _head(self, exchange: str, after: int, limit: int, now: float | None) -> list[Row]:
        sql = ("SELECT id, exchange, routing_key, body, headers, message_id, content_type, error FROM outbox "
               "WHERE exchange = ? AND id > ?")
        args: tuple[object, ...] = (exchange, after)
        if now is not None:
            sql, args = sql + " AND not_before <= ?", (*args, now)
        with self._lock:
            found = self._db.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [Row(i, Outgoing(ex, rk, bytes(body), json.loads(hdrs), mid, ctype), err)
                for i, ex, rk, body, hdrs, mid, ctype, err in found]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _draining(self, wait: float) -> Iterator[bool]:
        """Hold the drain of this outbox (this process's threads, then every process's flock) or say it is busy."""
        deadline = time.monotonic() + wait
        mine = self._drain_lock.acquire(timeout=wait) if wait > 0 else self._drain_lock.acquire(blocking=False)
        if not mine:
            yield False
            return
        try:
            with open(self.path + ".lock", "a") as fh:
                while True:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            yield False
                            return
                        time.sleep(0.05)
                try:
                    yield True
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            self._drain_lock.release()


def depth_of(settings: OutboxSettings) -> int | None:
    """Events waiting in the configured outbox file of this host, or None when there is no such file."""
    if not os.path.exists(settings.file):
        return None
    db = sqlite3.connect(f"file:{settings.file}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:  # a file without the table yet
        return 0
    finally:
        db.close()
