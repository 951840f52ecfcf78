"""Logging set-up: readable lines by default, JSON lines on request; per-message context fields.
No line carries credentials: the user and password of every URL in it are cut out, and every secret the process
loaded (broker passwords, signing keys: `keep_secret`) is replaced by *** (`masked`)."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from urllib.parse import quote

CONTEXT = ("event_id", "did", "outcome", "kind", "exit_code")
_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s]*@", re.IGNORECASE)
_SECRETS: tuple[str, ...] = ()  # longest first: a secret containing another is hidden whole
HIDDEN = "***"


def keep_secret(value: str | None) -> None:
    """From now on `masked` hides `value` wherever it appears (its URL-quoted spelling too). Values shorter
    than 4 characters are not registered: hiding them would garble ordinary text, and they are no secret."""
    global _SECRETS
    if value and len(value) >= 4:
        _SECRETS = tuple(sorted({*_SECRETS, value, quote(value, safe="")}, key=len, reverse=True))


def masked(text: str) -> str:
    """`text` with the user and password cut out of every URL in it (amqp://user:secret@host → amqp://host), and
    every kept secret replaced by ***."""
    text = _CREDENTIALS.sub(r"\1", text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, HIDDEN)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": masked(record.getMessage()),
        }
        data.update({k: getattr(record, k) for k in CONTEXT if getattr(record, k, None) is not None})
        if record.exc_info:
            data["exc"] = masked(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = masked(super().format(record))
        eid = getattr(record, "event_id", None)
        return f"{line} [event_id={eid}]" if eid else line


def setup(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("amqp", "kombu", "urllib3", "stomp.py", "requests"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
