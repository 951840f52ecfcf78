"""The watcher's hashing pool: files are read (size, adler32) on a few threads, so small files closed while a
big one is being read are announced at once instead of waiting behind it.

Bounded on both sides: at most `workers` files are read at a time, each through one CHUNK buffer
(`injector.checksum`), so memory does not grow with file size or backlog; the files ready meanwhile wait in
a backlog of candidates (a path each), in the order they became ready. Results come back in the order the
reads finished. zlib and file reads release the GIL, so threads read in parallel.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait

from injector.checksum import Cancelled
from injector.events import FileClosed
from producers.candidates import Candidate
from producers.refusals import Refusal

log = logging.getLogger(__name__)

Result = FileClosed | Refusal | None  # None: nothing to announce (vanished, unreadable: already logged)
Reader = Callable[[Candidate, Callable[[], bool]], Result]


class HashPool:
    """Reads candidates on `workers` threads; `done()` returns the results in the order they finished."""

    def __init__(self, workers: int, read: Reader) -> None:
        if workers < 1:
            raise ValueError(f"hash workers must be at least 1, not {workers}")
        self._workers = workers
        self._read = read
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash")
        self._backlog: deque[Candidate] = deque()
        self._running: dict[Future[Result], Candidate] = {}
        self._finished: queue.SimpleQueue[Future[Result]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.unfinished: list[Candidate] = []  # reads cancelled by `close`

    def add(self, candidates: Iterable[Candidate]) -> None:
        self._backlog.extend(candidates)

    def pump(self, halt: Callable[[], bool] = lambda: False) -> None:
        """Start reads while a worker is free (never more than `workers` at once) and `halt` says go on."""
        while self._backlog and len(self._running) < self._workers and not halt():
            c = self._backlog.popleft()
            future = self._executor.submit(self._read, c, self._stopping.is_set)
            self._running[future] = c
            future.add_done_callback(self._finished.put)

    def done(self) -> list[Result]:
        out: list[Result] = []
        while True:
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                return out
            c = self._running.pop(future)
            try:
                out.append(future.result())
            except (Cancelled, CancelledError):
                self.unfinished.append(c)
            except Exception:  # a bug in reading one file must not end the watcher
                log.exception("%s NOT announced: reading it failed", c.path)

    def reading(self) -> bool:
        return bool(self._running)

    def busy(self) -> bool:
        return bool(self._backlog or self._running)

    def wait(self, timeout: float) -> None:
        """Until a running read finishes, or `timeout` seconds."""
        if self._running:
            wait(list(self._running), timeout, return_when=FIRST_COMPLETED)

    def waiting(self) -> list[Candidate]:
        """Candidates not read yet: the backlog, reads running, reads cancelled."""
        return [*self._backlog, *self._running.values(), *self.unfinished]

    def close(self) -> list[Result]:
        """Stop the running reads at their next chunk, wait for the threads; returns what finished meanwhile (a
        read may complete before it sees the stop: its file must still be announced)."""
        self._stopping.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        return self.done()
