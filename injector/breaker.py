"""The circuit breaker around Rucio: one per process, shared by every Rucio call of its consumer.

An outage is never an event's fault. When a Rucio call fails in a way an outage would explain
(connection refused or reset, timeout, a 5xx), the gateway asks `healthy()`: a cheap probe
(`whoami`: the server answers, its database answers, our credentials work). If the probe fails
the breaker OPENS: every Rucio call fails fast with RucioDown, the batch worker holds its
messages unacked and takes no new deliveries, and `wait()` probes again with jittered, capped
exponential backoff (1 s → 60 s by default) until Rucio answers; then the breaker CLOSES and the
held batch is processed again (every handler is idempotent). If the probe passes, the failing
call is the batch's own problem and the breaker stays closed.

One WARNING when it opens, one INFO when it closes; never a line per probe.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

log = logging.getLogger(__name__)

Probe = Callable[[], None]  # returns when Rucio answers; raises otherwise


class Breaker:
    def __init__(self, probe: Probe, *, first: float = 1.0, cap: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self.first = first
        self.cap = cap
        self._clock = clock
        self._lock = threading.Lock()
        self._opened: float | None = None  # monotonic
        self.since: datetime | None = None  # wall clock, for people
        self.reason = ""
        self.outages = 0
        self.outage_seconds = 0.0  # closed outages, in total
        self.probes = 0
        self.listeners: list[Callable[[bool, float], None]] = []  # (opened, seconds the outage lasted when closed)

    @property
    def open(self) -> bool:
        return self._opened is not None

    def down_for(self) -> float:
        """Seconds the current outage has lasted (0 when closed)."""
        opened = self._opened
        return 0.0 if opened is None else self._clock() - opened

    def healthy(self) -> bool:
        """Probe now: True (and closed) when Rucio answers; False (and open) when it does not."""
        self.probes += 1
        try:
            self._probe()
        except Exception as exc:  # whatever the probe raised, Rucio did not answer
            self.trip(f"{type(exc).__name__}: {exc}")
            return False
        self.reset()
        return True

    def trip(self, why: str) -> None:
        """Open (idempotent): Rucio as a whole is unavailable."""
        with self._lock:
            if self._opened is not None:
                return
            self._opened = self._clock()
            self.since = datetime.now(UTC)
            self.reason = why[:500]
            self.outages += 1
        self._tell(True, 0.0)
        log.warning("Rucio unavailable (%s): holding messages unacked, taking no new deliveries, probing every "
                    "%g-%g s until it answers", self.reason, self.first, self.cap)

    def reset(self) -> None:
        """Close (idempotent): Rucio answers again."""
        with self._lock:
            if self._opened is None:
                return
            lasted = self._clock() - self._opened
            self._opened = None
            self.outage_seconds += lasted
        self._tell(False, lasted)
        log.info("Rucio available again after %.1f s; resuming", lasted)

    def _tell(self, opened: bool, lasted: float) -> None:
        for listener in self.listeners:
            listener(opened, lasted)

    def wait(self, stop: threading.Event, deadline: float | None = None) -> bool:
        """Probe with jittered, capped exponential backoff until Rucio answers (True), or until `stop` is set
        or the monotonic `deadline` passes (False). Returns at once when the breaker is closed."""
        attempt = 0
        while self.open:
            pause = random.uniform(self.first, min(self.cap, self.first * 2 ** attempt))
            if deadline is not None:
                pause = min(pause, max(deadline - self._clock(), 0.0))
            if stop.wait(pause) or (deadline is not None and self._clock() >= deadline):
                return not self.open
            attempt += 1
            self.healthy()
        return True
