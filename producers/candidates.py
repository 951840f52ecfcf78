"""Candidate files of the watcher, and the wait until each is quiet enough to announce."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from injector.config import Stream

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between looks at the files still settling


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file (or, with `tree`, every file below a directory) the watcher may announce."""

    stream: Stream
    path: str
    quiet: float  # announce once the file has not been modified for this many seconds (0: at once)
    tree: bool = False


class Settler:
    """Holds candidates until their file has gone `quiet` seconds unmodified (by its mtime: a write,
    a truncate or an append all move it; a rename keeps it)."""

    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._now: dict[str, Candidate] = {}  # announced at once (each once: the checksum is read later)
        self._waiting: dict[str, Candidate] = {}
        self._next_poll = 0.0

    def add(self, candidate: Candidate) -> None:
        """A new sighting; the shorter wait wins (a close after a sighting in a new directory)."""
        held = self._waiting.get(candidate.path)
        if candidate.path in self._now or (held is not None and held.quiet <= candidate.quiet):
            return
        if candidate.quiet <= 0:
            self._waiting.pop(candidate.path, None)
            self._now[candidate.path] = candidate
        else:
            self._waiting[candidate.path] = candidate
            self._next_poll = 0.0  # look at it on the next call: an old file is ready at once

    def ready(self) -> list[Candidate]:
        """Candidates to announce now, each once; vanished files are forgotten."""
        out, self._now = list(self._now.values()), {}
        if self._waiting and self._monotonic() >= self._next_poll:
            self._next_poll = self._monotonic() + POLL
            out += self._quiet_ones()
        return out

    def waiting(self) -> list[Candidate]:
        """Every candidate held and not yet returned by `ready`."""
        return [*self._now.values(), *self._waiting.values()]

    def _quiet_ones(self) -> list[Candidate]:
        out = []
        now = self._clock()
        for path, c in list(self._waiting.items()):
            try:
                age = now - os.stat(path).st_mtime
            except FileNotFoundError:
                log.debug("%s vanished while settling (a rename reports its new name)", path)
                del self._waiting[path]
                continue
            except OSError:
                age = c.quiet  # unreadable: announcing reports why
            if age >= c.quiet:
                out.append(c)
                del self._waiting[path]
        return out
