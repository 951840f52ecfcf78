"""Generated hostile messages through the REAL consumers, on the real RabbitMQ and the real Rucio server.

Every message must end processed or dead-lettered with a reason code, its body byte for byte as published; the
consumer never dies (a worker that raised fails `running`) and never stalls (the queue drains within a bound); and
nothing reaches Rucio that the contract forbids: every replica handed to Rucio has a DID name Rucio accepts, a PFN
that is the stream's prefix + a normalised path strictly below its root, a size that fits Rucio's BIGINT and an
adler32 of 8 hex digits; cleanup never releases anything for events about files no stream manages. The outcome
labels (metrics labels) stay a small set whatever the input.

The catalogue is tests/hostile.py. CI runs FUZZ_CASES (default 400 file-closed + half as many hermes messages);
the long run is `make fuzz` (10,000 + 5,000), its figures in the README.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from consumers.services import cleanup_worker, ingest_worker
from injector.config import Settings
from injector.events import decode_file_closed
from injector.gateway import ClientGateway
from injector.messages import Outgoing
from injector.streams import DID_NAME
from injector.transport import plugin
from tests.hostile import BIG, Case, file_closed_case, hermes_case, junk_headers, valid_event
from tests.integration.conftest import Lab
from tests.integration.rabbit import dead_letters, declared, running, unique_settings, wait_for, waiting

pytestmark = pytest.mark.integration

CASES = int(os.environ.get("FUZZ_CASES", "400"))
SEED = int(os.environ.get("FUZZ_SEED", "20261129"))
INGEST_REASONS = {"invalid-event", "no-stream", "path-outside-root", "path-not-canonical", "invalid-name",
                  "template-field-missing", "checksum-conflict"}


class Recording:
    """The real gateway, recording every call made through it (what reached Rucio)."""

    def __init__(self, inner: ClientGateway) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            return attr(*args, **kwargs)

        return call


def publish(s: Settings, exchange: str, routing_key: str, cases: list[Case]) -> None:
    sender = plugin("amqp").sender(s.broker, None)
    try:
        for i in range(0, len(cases), 500):
            sender.publish([Outgoing(exchange, routing_key, c.body, c.headers, c.message_id)
                            for c in cases[i:i + 500]])
    finally:
        sender.close()


def symlink_cases(lab: Lab, rng: random.Random, outside: Path) -> list[Case]:
    """Paths through symlinks: one leaving the root, one an alias of a directory inside it."""
    (outside / "run.fits").write_bytes(b"outside")
    (lab.root / "escape").symlink_to(outside)
    (lab.root / "real").mkdir()
    (lab.root / "real" / "run.fits").write_bytes(b"inside")
    (lab.root / "alias").symlink_to(lab.root / "real")
    out = []
    for kind, path in (("symlink-out", lab.root / "escape" / "run.fits"), ("symlink-alias", lab.root / "alias" /
                                                                            "run.fits")):
        event = valid_event(rng, str(lab.root))
        event["path"] = str(path)
        out.append(Case(kind, json.dumps(event).encode(), junk_headers(rng), True))
    return out


def test_generated_file_closed_messages_are_each_processed_or_dead_lettered_and_nothing_forbidden_reaches_rucio(
        lab: Lab, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    root = str(lab.root)
    cases = [file_closed_case(rng, root) for _ in range(CASES)] + symlink_cases(lab, rng, tmp_path)
    rng.shuffle(cases)
    s = unique_settings({"streams": [lab.stream()]}, ingest={"batch_window": 0.1})
    rucio = Recording(ClientGateway(s.rucio))
    started = time.monotonic()
    with declared(s):
        publish(s, s.broker.daq_exchange, "file.closed.ORM.LST1", cases)
        worker = ingest_worker(s, rucio)  # type: ignore[arg-type]
        with running(worker):
            wait_for(lambda: waiting(s, s.ingest.queue) == 0 and worker.stats.messages >= len(cases),
                     timeout=120 + len(cases) / 20, what=f"{len(cases)} messages settled")
            assert worker.metrics.health()[0], "the consumer is healthy at the end"
        dead = {r.id: r for r in dead_letters(s)}
    took = time.monotonic() - started
    kinds = Counter(c.kind for c in cases)
    reasons: Counter[str] = Counter()
    registered = []
    for c in cases:
        r = dead.pop(c.message_id, None)
        if r is not None:
            assert r.body == c.body, f"{c.kind}: the dead letter's body was changed"
            assert r.reason in INGEST_REASONS, f"{c.kind}: unexpected reason {r.reason}: {r.error}"
            assert c.valid is not True or r.reason != "invalid-event", f"{c.kind}: a valid body refused: {r.error}"
            reasons[r.reason] += 1
        else:
            assert c.valid is not False, f"{c.kind} was not dead-lettered: {c.body[:200]!r}"
            registered.append(decode_file_closed(c.body))
    assert not dead, f"dead letters of messages never published: {list(dead)[:5]}"
    assert [c for c in cases if c.kind.startswith("symlink")] and all(
        e.path not in {str(lab.root / "escape" / "run.fits"), str(lab.root / "alias" / "run.fits")}
        for e in registered), "a path through a symlink was registered"
    replicas = [r for name, args in rucio.calls if name == "register" for g in args[0] for r in g.replicas]
    for r in replicas:
        path = r.pfn.removeprefix("file://localhost")
        assert DID_NAME.fullmatch(r.name) and r.pfn.startswith("file://localhost/"), r
        assert posixpath.normpath(path) == path and path.startswith(root + "/"), r
        assert 0 <= r.bytes < BIG and len(r.adler32) == 8 and int(r.adler32, 16) >= 0, r
    assert {r.name for r in replicas} == {e.path for e in registered}
    names = sorted({e.path for e in registered})
    found = {k: v for i in range(0, len(names), 500) for k, v in lab.replicas(names[i:i + 500]).items()}
    assert all((found[e.path]["bytes"], found[e.path]["adler32"]) == (e.size, e.adler32) for e in registered)
    labels = set(worker.stats.outcomes)
    assert len(labels) <= len(INGEST_REASONS) + 4, labels
    print(f"\nfuzz ingest: {len(cases)} messages ({dict(kinds)}) in {took:.1f}s: {len(registered)} registered, "
          f"{sum(reasons.values())} dead-lettered {dict(reasons)}, {len(replicas)} replicas handed to Rucio")


def test_generated_hermes_messages_are_each_acked_or_dead_lettered_and_release_nothing(lab: Lab) -> None:
    rng = random.Random(SEED + 1)
    cases = [hermes_case(rng) for _ in range(max(CASES // 2, 50))]
    s = unique_settings({"streams": [lab.stream()]}, cleanup={"batch_window": 0.1})
    rucio = Recording(ClientGateway(s.rucio))
    with declared(s):
        worker = cleanup_worker(s, rucio)  # type: ignore[arg-type]
        with running(worker):
            publish(s, "amq.topic", s.cleanup.topic, cases)
            wait_for(lambda: waiting(s, s.cleanup.queue) == 0 and worker.stats.messages >= len(cases),
                     timeout=120 + len(cases) / 20, what=f"{len(cases)} hermes messages settled")
        dead = {r.id: r for r in dead_letters(s, s.cleanup.queue)}
    for c in cases:
        r = dead.pop(c.message_id, None)
        if c.valid is False:
            assert r is not None and r.reason == "invalid-event" and r.body == c.body, c
        elif r is not None:  # a well-formed envelope whose payload Rucio cannot answer for
            assert r.body == c.body and r.reason in ("invalid-event", "rucio-refused"), (c, r.error)
    assert not dead
    assert not [name for name, _ in rucio.calls if name in ("set_tombstones", "mark")], "something was released"
    assert len(worker.stats.outcomes) <= 12, worker.stats.outcomes
    print(f"\nfuzz cleanup: {len(cases)} hermes messages: {dict(worker.stats.outcomes)}")
