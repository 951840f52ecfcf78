"""Test doubles shipped with the package: an in-memory Rucio and an in-memory broker session.

They follow the real behaviour that matters here (checked against the real server by the
integration tests): re-adding a replica is silently skipped, attaching twice with
ignore_duplicate is harmless, a second identical rule is refused as a duplicate.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from injector.config import Rule
from injector.errors import PermissionDenied, RucioRefused, RucioUnavailable
from injector.gateway import Attachment, FileMeta, FileReplicas, NewReplica
from injector.messages import Delivery, Outgoing


@dataclass
class FakeRule:
    scope: str
    name: str
    rse_expression: str
    copies: int
    activity: str


class FakeRucio:
    """In-memory RucioGateway. `fail(op, exc, times)` makes the next calls of `op` raise."""

    def __init__(self, rses: dict[str, str] | None = None, scopes: Sequence[str] = ("lst", "magic")) -> None:
        self.prefixes = dict(rses or {})  # name -> PFN prefix its protocol accepts
        self.scopes = set(scopes)
        self.files: dict[tuple[str, str], FileMeta] = {}
        self.meta: dict[tuple[str, str], dict[str, Any]] = {}
        self.datasets: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.closed: set[tuple[str, str]] = set()
        self.pfns: dict[tuple[str, str, str], str] = {}  # (rse, scope, name) -> pfn
        self.states: dict[tuple[str, str, str], str] = {}  # default AVAILABLE
        self.tombstoned: set[tuple[str, str, str]] = set()
        self.locked: set[tuple[str, str, str]] = set()
        self.expressions: dict[str, set[str]] = {}  # RSE expression -> RSEs (default: itself)
        self.rules: list[FakeRule] = []
        self.calls: Counter[str] = Counter()
        self.denied_scopes: set[str] = set()
        self._faults: dict[str, list[Exception]] = {}

    def fail(self, op: str, exc: Exception, times: int = 1) -> None:
        self._faults.setdefault(op, []).extend([exc] * times)

    def _enter(self, op: str) -> None:
        self.calls[op] += 1
        queue = self._faults.get(op)
        if queue:
            raise queue.pop(0)

    def _scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise RucioRefused(f"ScopeNotFound: scope {scope!r} does not exist")
        if scope in self.denied_scopes:
            raise PermissionDenied(f"AccessDenied: account cannot write scope {scope!r}")

    def file_metadata(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FileMeta]:
        self._enter("file_metadata")
        return {d: self.files[d] for d in dids if d in self.files}

    def add_replicas(self, rse: str, replicas: Sequence[NewReplica]) -> None:
        self._enter("add_replicas")
        if rse not in self.prefixes:
            raise RucioRefused(f"RSENotFound: RSE {rse!r} does not exist")
        for r in replicas:  # validate the whole call first: Rucio refuses it as a unit
            self._scope(r.scope)
            if not r.pfn.startswith(self.prefixes[rse]):
                raise RucioRefused(f"RSEFileNameNotSupported: {r.pfn} is not under {self.prefixes[rse]}")
        for r in replicas:
            self.files.setdefault((r.scope, r.name), FileMeta(r.scope, r.name, r.bytes, r.adler32))
            self.pfns.setdefault((rse, r.scope, r.name), r.pfn)
            if r.meta and (r.scope, r.name) not in self.meta:
                self.meta[(r.scope, r.name)] = dict(r.meta)

    def add_dataset(self, scope: str, name: str, rules: Sequence[Rule]) -> bool:
        self._enter("add_dataset")
        self._scope(scope)
        if (scope, name) in self.datasets:
            return False
        self.datasets[(scope, name)] = set()
        for rule in rules:
            self.rules.append(FakeRule(scope, name, rule.rse_expression, rule.copies, rule.activity))
        return True

    def dataset_rules(self, scope: str, name: str) -> list[tuple[str, int]]:
        self._enter("dataset_rules")
        return [(r.rse_expression, r.copies) for r in self.rules if (r.scope, r.name) == (scope, name)]

    def add_rule(self, scope: str, name: str, rule: Rule) -> bool:
        self._enter("add_rule")
        if (rule.rse_expression, rule.copies) in self.dataset_rules(scope, name):
            return False
        self.rules.append(FakeRule(scope, name, rule.rse_expression, rule.copies, rule.activity))
        return True

    def attach(self, attachments: Sequence[Attachment]) -> None:
        self._enter("attach")
        for a in attachments:
            if (a.scope, a.dataset) not in self.datasets:
                raise RucioRefused(f"DataIdentifierNotFound: {a.scope}:{a.dataset}")
            if (a.scope, a.dataset) in self.closed:
                raise RucioRefused(f"UnsupportedOperation: {a.scope}:{a.dataset} is closed")
            for did in a.files:
                if did not in self.files:
                    raise RucioRefused(f"DataIdentifierNotFound: {did[0]}:{did[1]}")
        for a in attachments:
            self.datasets[(a.scope, a.dataset)].update(a.files)


    def replicas(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FileReplicas]:
        self._enter("replicas")
        out = {}
        for scope, name in dids:
            meta = self.files.get((scope, name))
            if meta is None:
                continue
            held = [(rse, pfn) for (rse, s, n), pfn in self.pfns.items() if (s, n) == (scope, name)]
            out[(scope, name)] = FileReplicas(
                scope, name, meta.bytes, meta.adler32,
                {rse: self.states.get((rse, scope, name), "AVAILABLE") for rse, _ in held},
                {rse: [pfn] for rse, pfn in held})
        return out

    def rses(self, expression: str) -> frozenset[str]:
        self._enter("rses")
        return frozenset(self.expressions.get(expression, {expression}))

    def set_tombstones(self, replicas: Sequence[tuple[str, str, str]]) -> None:
        self._enter("set_tombstones")
        for scope, name, rse in replicas:
            if (rse, scope, name) in self.locked:
                raise RucioRefused(f"ReplicaIsLocked: {scope}:{name} at {rse} is locked by a rule")
            if (rse, scope, name) not in self.pfns:
                raise RucioRefused(f"ReplicaNotFound: {scope}:{name} at {rse}")
        self.tombstoned.update((rse, scope, name) for scope, name, rse in replicas)

    def marks(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        self._enter("marks")
        return {d: dict(self.meta.get(d, {})) for d in dids if d in self.files}

    def mark(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        self._enter("mark")
        for scope, name, meta in items:
            if (scope, name) not in self.files:
                raise RucioRefused(f"DataIdentifierNotFound: {scope}:{name}")
            self.meta.setdefault((scope, name), {}).update(meta)

    def add_replica(self, rse: str, scope: str, name: str, pfn: str = "", state: str = "AVAILABLE") -> None:
        """Test set-up: a replica as a transfer would leave it."""
        self.pfns[(rse, scope, name)] = pfn or f"file://localhost/{rse.lower()}/{name.lstrip('/')}"
        self.states[(rse, scope, name)] = state

    def reap(self, rse: str) -> list[tuple[str, str]]:
        """Test set-up: what the reaper would do with tombstoned replicas at an RSE."""
        gone = [(s, n) for (r, s, n) in self.tombstoned if r == rse]
        for s, n in gone:
            self.pfns.pop((rse, s, n), None)
            self.states.pop((rse, s, n), None)
        self.tombstoned = {t for t in self.tombstoned if t[0] != rse}
        return gone


class Unavailable(RucioUnavailable):
    """Convenience: a transient Rucio fault for `FakeRucio.fail`."""


_tags = itertools.count(1)


def delivery(body: bytes, *, routing_key: str = "file.closed.ORM.LST1", headers: dict[str, Any] | None = None,
             message_id: str | None = None, attempts: int = 1) -> Delivery:
    """A Delivery as the broker would hand it over (attempts > 1 means a redelivery)."""
    hdrs = dict(headers or {})
    if attempts > 1:
        hdrs["x-delivery-count"] = attempts - 1
    return Delivery(body, hdrs, "rucio-injector.daq", routing_key, next(_tags), attempts > 1, message_id,
                    "application/json")


@dataclass
class MemorySession:
    """In-memory injector.settle.Session: records what settling did."""

    acked: list[Delivery] = field(default_factory=list)
    requeued: list[Delivery] = field(default_factory=list)
    published: list[Outgoing] = field(default_factory=list)
    dead_letters: list[Outgoing] = field(default_factory=list)
    refuse_publish: bool = False

    def ack(self, d: Delivery) -> None:
        self.acked.append(d)

    def requeue(self, d: Delivery) -> None:
        self.requeued.append(d)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        from injector.errors import PublishFailed

        if self.refuse_publish:
            raise PublishFailed("broker refused (test)")
        self.published.extend(messages)

    def dead_letter(self, messages: Sequence[Outgoing]) -> None:
        from injector.errors import PublishFailed

        if self.refuse_publish:
            raise PublishFailed("broker refused (test)")
        self.dead_letters.extend(messages)
