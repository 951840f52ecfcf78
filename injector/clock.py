"""Time as the project reads it: ONE parser for every timestamp that comes from outside (hermes' created_at,
file-closed's occurred_at, dead-letter headers, Rucio's API), and one rule for clocks that run ahead.

  * a time without a zone is UTC (what Rucio and hermes send: "2026-11-25 01:02:03.456789");
  * an offset is honoured: "…T03:02:03+02:00" is 01:02:03 UTC; "Z" is UTC;
  * RFC 1123 text as Rucio's client returns it ("Wed, 25 Nov 2026 01:02:03 UTC") is read too;
  * anything else is a `BadTime` naming what was read and why, never a silent "now";
  * `received`: a time more than `SKEW` ahead of the receiver's clock is clamped to the receive time, logged and
    counted (`clamped()`, exported as rucio_injector_future_timestamps_clamped).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from injector.errors import InvalidEvent

log = logging.getLogger(__name__)

SKEW = timedelta(minutes=5)  # clocks ahead by less than this are believed (NTP-synced hosts differ by far less)

_lock = threading.Lock()
_clamped = 0


class BadTime(InvalidEvent):
    """A timestamp that is not a time: the message names whose, which field and the text."""


def parse(value: str | datetime, what: str) -> datetime:
    """`value` as an aware UTC datetime (naive = UTC, offsets honoured); `what` names it in errors."""
    if isinstance(value, datetime):
        return _utc(value)
    if not isinstance(value, str) or not value.strip():
        raise BadTime(f"{what}: {value!r} is not a time (expected ISO 8601, e.g. 2026-11-25T01:02:03Z)")
    text = value.strip()
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        pass
    try:
        return _utc(parsedate_to_datetime(text))
    except (TypeError, ValueError):
        raise BadTime(f"{what}: {value!r} is not a time (expected ISO 8601, e.g. 2026-11-25T01:02:03Z)") from None


def received(value: str | datetime, what: str, now: datetime | None = None, skew: timedelta = SKEW) -> datetime:
    """`parse`, then a time more than `skew` ahead of `now` (the receive time) becomes `now`, counted."""
    t = parse(value, what)
    now = now or datetime.now(UTC)
    if t - now > skew:
        global _clamped
        with _lock:
            _clamped += 1
        log.warning("%s: %s is %s ahead of this host's clock (more than %s): using the receive time %s",
                    what, t.isoformat(), t - now, skew, now.isoformat())
        return now
    return t


def ahead(t: datetime, now: datetime | None = None, skew: timedelta = SKEW) -> timedelta | None:
    """How far `t` runs ahead of `now` beyond the allowed skew; None when it does not."""
    lead = t - (now or datetime.now(UTC))
    return lead if lead > skew else None


def clamped() -> int:
    """Future timestamps clamped by this process so far."""
    return _clamped


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
