"""The watcher's way from a candidate file to the broker: settling, refusal or hashing, batched announcing.

`producers.watch` feeds it and runs it; this module decides, per candidate, what happens to the file.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from producers.announcer import Announcer
from producers.candidates import Candidate, Settler
from producers.hashing import HashPool, Result
from producers.refusals import Refusal, Refusals, refusal

if TYPE_CHECKING:
    from producers.watch import Watcher

log = logging.getLogger(__name__)


@dataclass
class Edge:
    """The watcher's parts, from inotify to the broker: candidates → settling → refusals or hashing → events."""

    watcher: Watcher
    refusals: Refusals
    pool: HashPool
    announcer: Announcer
    settler: Settler = field(default_factory=Settler)

    def step(self, flush: Callable[[], object], halt: Callable[[], bool], timeout: float) -> None:
        """Take the new candidates, start reading those ready while `halt` says go on (a long backlog, as
        --existing over a full buffer, must not delay a SIGTERM), and queue the events read meanwhile."""
        if self.pool.reading():  # wake for a finished read too: the backlog moves at the pace of the reads
            self.pool.wait(timeout)
            self._gather(0)
        else:
            self._gather(timeout)
        self.pool.add(self.settler.ready())
        self.pool.pump(halt)
        self._take(self.pool.done(), flush)

    def _take(self, results: list[Result], flush: Callable[[], object]) -> None:
        for result in results:
            if isinstance(result, Refusal):
                self.refusals.report(result)
            elif result is not None:
                self.announcer.add(result)
                if self.announcer.due():
                    flush()

    def _gather(self, timeout: float) -> None:
        try:
            first: Candidate | None = (self.watcher.candidates.get(timeout=timeout) if timeout > 0
                                       else self.watcher.candidates.get_nowait())
        except queue.Empty:
            return
        while first is not None:
            for c in self.watcher.files(first):
                refused = refusal(c.stream, c.path)
                if refused is None:
                    self.settler.add(c)
                else:
                    self.refusals.report(refused)
            try:
                first = self.watcher.candidates.get_nowait()
            except queue.Empty:
                first = None

    def finish(self, shutdown_timeout: float) -> int:
        """After the stop: announce every file closed before it; files still settling may change, so they wait
        for the next start (with --existing)."""
        deadline = time.monotonic() + shutdown_timeout / 2  # the other half for publishing
        self.step(lambda: None, lambda: time.monotonic() > deadline, timeout=0)
        while self.pool.busy() and time.monotonic() < deadline:
            self.pool.wait(max(deadline - time.monotonic(), 0.0))
            self.step(lambda: None, lambda: time.monotonic() > deadline, timeout=0)
        self._take(self.pool.close(), lambda: None)
        self.step(lambda: None, lambda: True, timeout=0)
        for c in [*self.settler.waiting(), *self.pool.waiting()]:
            log.warning("%s NOT announced when stopped (still settling, or no time left to read it); "
                        "`watch --existing` announces it", c.path)
        recorded = self.refusals.flush(force=True)
        for r in self.refusals.pending:
            log.error("%s refused but NOT recorded: broker unavailable at shutdown; the next start records it",
                      r.shown)
        if self.announcer.flush_final(shutdown_timeout / 2) and recorded:
            return 0
        for e in self.announcer.pending:  # never written to the outbox (full, unwritable): only the file is left
            log.error("%s NOT announced: broker unavailable at shutdown; `watch --existing` announces it", e.path,
                      extra={"event_id": str(e.event_id)})
        for e in self.announcer.unconfirmed():
            log.error("%s not announced yet: broker unavailable at shutdown; kept in the outbox, the next `watch` or "
                      "`publish --flush` sends it", e.path, extra={"event_id": str(e.event_id)})
        return 1
