"""Hostile input, one catalogue for every fuzzing driver: the hypothesis properties of the decoders
(tests/unit/test_fuzz.py) and the run of generated messages through the real consumers
(tests/integration/test_fuzz_consumers.py).

A case is a message as a broker would carry it (body bytes + headers) and the kind of damage done to it. A file-closed
case starts from a valid event for a file below `root` and applies one mutation of MUTATIONS: wrong types, missing
fields, huge or negative sizes, malformed adler32, bytes that are not UTF-8, oversized bodies, deeply nested JSON,
unicode and control characters in names, `..`, foreign URL schemes, unknown schema versions, duplicate keys, junk
headers. `valid` is what the contract says of the body: True (must decode), False (must be refused as
`invalid-event`), None (decodes; whether it can be ingested is the stream's decision: outside the root, a name Rucio
refuses, a symlink).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

BIG = 2**63  # one past Rucio's bytes column (BIGINT)


@dataclass(frozen=True)
class Case:
    kind: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    valid: bool | None = None
    message_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def valid_event(rng: random.Random, root: str, site: str = "ORM", instrument: str = "LST1") -> dict[str, Any]:
    """A file-closed/1 event that the contract accepts, for a file below `root`."""
    night = f"2026{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    name = f"LST-1.1.Run{rng.randint(0, 99999):05d}.{rng.randint(0, 9999):04d}.fits.fz"
    event: dict[str, Any] = {
        "schema": "file-closed/1", "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurred_at": (datetime.now(UTC) - timedelta(seconds=rng.randint(0, 10**7))).isoformat().replace(
            "+00:00", "Z"),
        "site": site, "instrument": instrument, "path": f"{root}/{night}/{name}",
        "size": rng.randint(0, 10**12), "adler32": f"{rng.getrandbits(32):08x}", "night": night,
        "run": rng.randint(0, 10**6)}
    if rng.random() < 0.3:
        event["md5"] = f"{rng.getrandbits(128):032x}"
    if rng.random() < 0.3:
        event["metadata"] = {"telescope": "LST-1", "zenith": rng.random() * 90, "moon": rng.random() < 0.5}
    return event


def _dump(event: Any) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()


WRONG_TYPES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, "1e3", 10**40]
REQUIRED = ("schema", "event_id", "occurred_at", "site", "instrument", "path", "size", "adler32")
FIELDS = (*REQUIRED, "md5", "run", "night", "datatype", "metadata")
ODD_TEXT = ["\u202e", "\u200b", "\u0000", "\n", "\r\n", "\t", "\x7f", "é", "日本語", "🔭", "e\u0301", "\ud7ff", " ",
            "%2e%2e", "\\", "$", "*", "#", ">", "'", '"', "<script>"]


EXPECTED: dict[str, type] = {"size": int, "run": int, "metadata": dict}  # the others are strings


def _wrong_type(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    key = rng.choice(FIELDS)
    want = EXPECTED.get(key, str)
    pool = [v for v in WRONG_TYPES if not isinstance(v, want) or isinstance(v, bool)]  # strict: a bool is no int
    e[key] = rng.choice([v for v in pool if v is not None or key in REQUIRED])  # an optional field may be null
    return _dump(e), False


def _missing(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    del e[rng.choice(REQUIRED)]
    return _dump(e), False


def _huge_size(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e["size"] = rng.choice([BIG, 2**64, 10**30, 10**400])
    return _dump(e), False


def _negative(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e[rng.choice(["size", "run"])] = rng.choice([-1, -(2**63), -(10**30)])
    return _dump(e), False


def _bad_adler32(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e["adler32"] = rng.choice(["DEADBEEF", "0x1234ab", "1234567", "123456789", "zzzzzzzz", "", " 1234567",
                               "1234567\n", "１２３４５６７８", 12345678])
    return _dump(e), False


def _not_utf8(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    body = bytearray(_dump(e))
    at = body.index(b'"path"') + 9 + rng.randint(0, 5)
    body[at:at] = rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
    return bytes(body), False


def _oversized(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e["metadata"] = {"blob": "x" * rng.choice([2**20, 4 * 2**20])}
    return _dump(e), None  # within the contract (a scalar value); what Rucio makes of it is ingest's business


def _deep(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    depth = rng.choice([200, 5000, 100_000])
    nested = "[" * depth + "]" * depth
    if rng.random() < 0.5:
        return nested.encode(), False
    return _dump(e)[:-1] + f', "metadata": {{"deep": {nested}}}}}'.encode(), False


def _odd_name(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    head, _, tail = e["path"].rpartition("/")
    e["path"] = f"{head}/{rng.choice(ODD_TEXT)}{tail}{rng.choice(ODD_TEXT)}"
    return _dump(e), None


def _dot_dot(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    head, _, tail = e["path"].rpartition("/")
    e["path"] = rng.choice([f"{head}/../../../etc/{tail}", f"{head}/./{tail}", f"{head}//{tail}", f"{head}/..",
                            f"{head}/../{head.rsplit('/', 1)[-1]}/{tail}", "/", "/../etc/passwd"])
    return _dump(e), None


def _foreign_scheme(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e["path"] = rng.choice(["file://", "root://eos.example.org/", "https://x.example.org", "gsiftp://h",
                            "s3://bucket", "srm://h:8443/srm/managerv2?SFN=", "../", "~/", "C:\\"]) + \
        e["path"].lstrip("/")
    return _dump(e), False


def _schema(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e["schema"] = rng.choice(["file-closed/2", "file-closed/0", "file-closed", "FILE-CLOSED/1", "file-archived/1",
                              "", "file-closed/1 ", None, 1])
    return _dump(e), False


def _duplicate_keys(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    key = rng.choice(["size", "path", "adler32", "site"])
    bad = json.dumps(rng.choice(["not-a-size", -5, "/elsewhere", "XYZ", None]))
    body = _dump(e)[:-1].decode()
    first = rng.random() < 0.5  # the bad value first (the good one wins) or last (the bad one wins)
    text = ("{" + f'"{key}": {bad}, ' + body[1:] + "}") if first else (body + f', "{key}": {bad}' + "}")
    return text.encode(), None


def _extra_field(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e[rng.choice(["pfn", "rse", "scope", "name", "__proto__", "Path", "sizе"])] = "x"  # "sizе": a Cyrillic е
    return _dump(e), False


def _times(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e["occurred_at"], valid = rng.choice([
        ("2026-11-29T10:00:00", False), ("2026-11-29T10:00:00+02:00", False), ("yesterday", False), ("", False),
        ("2026-13-45T99:99:99Z", False), ("9999-12-31T23:59:59Z", False),  # far ahead of any clock
        ("Sun, 29 Nov 2026 10:00:00 GMT", False), ("0001-01-01T00:00:00Z", True), ("2026-11-29T10:00:00.5Z", True),
        (1764410400, None)])
    return _dump(e), valid


def _words(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    e[rng.choice(["site", "instrument", "datatype"])] = rng.choice(["a.b", "#", "*", "", "ORM ", "-x", "x" * 65,
                                                                     "ÖRM", "ORM\n"])
    return _dump(e), False


def _not_an_event(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    return rng.choice([b"", b"null", b"[]", b"1", b'"file-closed/1"', b"{", b"{}", b"\x00" * 16,
                       rng.randbytes(rng.randint(1, 512)), b"\xef\xbb\xbf" + _dump(e)]), False


def _valid(rng: random.Random, e: dict[str, Any]) -> tuple[bytes, bool | None]:
    return _dump(e), True


MUTATIONS: dict[str, Callable[[random.Random, dict[str, Any]], tuple[bytes, bool | None]]] = {
    "valid": _valid, "wrong-type": _wrong_type, "missing-field": _missing, "huge-size": _huge_size,
    "negative": _negative, "bad-adler32": _bad_adler32, "not-utf8": _not_utf8, "oversized": _oversized,
    "deep-json": _deep, "odd-name": _odd_name, "dot-dot": _dot_dot, "foreign-scheme": _foreign_scheme,
    "schema-version": _schema, "duplicate-keys": _duplicate_keys, "extra-field": _extra_field, "times": _times,
    "words": _words, "not-an-event": _not_an_event,
}


def junk_headers(rng: random.Random) -> dict[str, Any]:
    """Headers a careless or hostile publisher may add: odd names, types and sizes (never ours: dlq-*)."""
    pool: list[tuple[str, Any]] = [("x-trace", "abc"), ("schema", "file-closed/9"), ("event-id", "not-a-uuid"),
                                   ("ünïcødé", "✓"), ("empty", ""), ("n", 12345), ("f", 1.5), ("b", True),
                                   ("long", "y" * 10_000), ("injector-retries", rng.choice([-1, 99, "x"])),
                                   ("x-delivery-count", "lots")]
    return dict(rng.sample(pool, rng.randint(0, 4)))


def file_closed_case(rng: random.Random, root: str, kind: str | None = None) -> Case:
    kind = kind or rng.choice(list(MUTATIONS))
    body, valid = MUTATIONS[kind](rng, valid_event(rng, root))
    return Case(kind, body, junk_headers(rng) if rng.random() < 0.3 else {}, valid)


HERMES_TYPES = ("transfer-done", "transfer-failed", "deletion-done", "deletion-failed", "rule_ok", "transfer-queued")


def hermes_case(rng: random.Random) -> Case:
    """A hermes message, well formed or not; well formed ones name files no stream manages or nothing at all."""
    payload: dict[str, Any] = {"scope": rng.choice(["lst", "other", "", None, 7]),
                               "name": rng.choice(["/x/y.fits", "", "a" * 300, "../../etc", "\u202e", None]),
                               "src-rse": "ORM-BUFFER", "dst-rse": rng.choice(["PIC-ARCHIVE", "", None]),
                               "checksum-adler": rng.choice(["deadbeef", "", "XYZ", None]),
                               "bytes": rng.choice([1, -1, BIG, "1"])}
    event: dict[str, Any] = {"event_type": rng.choice([*HERMES_TYPES, "", "x" * 300, "TRANSFER-DONE", 5, None]),
                             "payload": payload, "created_at": rng.choice([
                                 "2026-11-29 10:00:00.000000", "9999-12-31 23:59:59", "garbage", None, 5])}
    kind = rng.choice(["valid-envelope", "no-payload", "payload-not-object", "not-json", "deep-json", "not-utf8"])
    if kind == "no-payload":
        del event["payload"]
    elif kind == "payload-not-object":
        event["payload"] = rng.choice([[], "x", None, 1])
    elif kind == "not-json":
        return Case(kind, rng.choice([b"", b"{", rng.randbytes(64), b"null"]), junk_headers(rng), False)
    elif kind == "deep-json":
        return Case(kind, ("[" * 100_000 + "]" * 100_000).encode(), {}, False)
    body = _dump(event)
    if kind == "not-utf8":
        return Case(kind, body[:5] + b"\xff" + body[5:], {}, False)
    valid = isinstance(event["event_type"], str) and isinstance(event.get("payload"), dict) and (
        event["created_at"] is None or isinstance(event["created_at"], str))
    return Case(kind, body, junk_headers(rng) if rng.random() < 0.3 else {}, valid)
