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
from injector.gateway import Attachment, FileMeta, NewReplica
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
        self.rses = dict(rses or {})  # name -> PFN prefix its protocol accepts
        self.scopes = set(scopes)
        self.files: dict[tuple[str, str], FileMeta] = {}
        self.datasets: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.closed: set[tuple[str, str]] = set()
        self.replicas: dict[tuple[str, str, str], str] = {}
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
        if rse not in self.rses:
            raise RucioRefused(f"RSENotFound: RSE {rse!r} does not exist")
        for r in replicas:  # validate the whole call first: Rucio refuses it as a unit
            self._scope(r.scope)
            if not r.pfn.startswith(self.rses[rse]):
                raise RucioRefused(f"RSEFileNameNotSupported: {r.pfn} is not under {self.rses[rse]}")
        for r in replicas:
            self.files.setdefault((r.scope, r.name), FileMeta(r.scope, r.name, r.bytes, r.adler32))
            self.replicas.setdefault((rse, r.scope, r.name), r.pfn)

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
