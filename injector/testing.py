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
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlparse

from injector.breaker import Breaker
from injector.config import Rule
from injector.errors import ChecksumConflict, PermissionDenied, ReplicaGone, RucioDown, RucioRefused, RucioUnavailable
from injector.gateway import AccountInfo, Attachment, DatasetState, FileMeta, FileReplicas, NewReplica, Registration
from injector.messages import Delivery, Outgoing

_rule_ids = itertools.count(1)


@dataclass
class FakeRule:
    scope: str
    name: str
    rse_expression: str
    copies: int
    activity: str
    id: str = field(default_factory=lambda: f"rule{next(_rule_ids)}")
    state: str = "OK"
    expires_at: datetime | None = None
    locked: bool = False
    child_rule_id: str | None = None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """The rule as Rucio's list_did_rules shows it."""
        return dict(vars(self))


class FakeRucio:
    """In-memory RucioGateway (and RucioInspector). `fail(op, exc, times)` makes the next calls of `op` raise."""

    def __init__(self, rses: dict[str, str] | None = None, scopes: Sequence[str] = ("lst", "magic")) -> None:
        self.prefixes = dict(rses or {})  # name -> PFN prefix its protocol accepts
        self.scopes = set(scopes)
        self.files: dict[tuple[str, str], FileMeta] = {}
        self.meta: dict[tuple[str, str], dict[str, Any]] = {}  # files' and datasets' JSON metadata
        self.created: dict[tuple[str, str], datetime] = {}  # DID -> created_at (`clock` when it was added)
        self.clock = lambda: datetime.now(UTC)
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
        self.lock_table: list[dict[str, Any]] = []  # replica locks: scope, name, rse, state, rule_id
        self.rse_settings: dict[str, dict[str, Any]] = {}  # rse -> overrides of rse_info()
        self.in_flight: set[tuple[str, str, str, str]] = set()  # (source, destination, scope, name)
        self.boosted: list[str] = []
        self.transfer_history: dict[tuple[str, str, str], list[dict[str, Any]]] = {}  # (scope, name, rse) -> requests
        self.account = AccountInfo("root", True, frozenset(self.scopes), {}, {})  # what account_info() answers
        self._faults: dict[str, list[Exception]] = {}
        self.down = False  # an outage: every call fails and the health probe too, until it is set back
        self.breaker = Breaker(self._probe, first=0.01, cap=0.05)

    def _probe(self) -> None:
        if self.down:
            raise ConnectionRefusedError("fake Rucio is down")

    def fail(self, op: str, exc: Exception, times: int = 1) -> None:
        self._faults.setdefault(op, []).extend([exc] * times)

    def _enter(self, op: str) -> None:
        if self.breaker.open:  # as ClientGateway: fail fast while the breaker is open
            raise RucioDown(f"Rucio unavailable: {self.breaker.reason}")
        self.calls[op] += 1
        if self.down:
            self.breaker.trip("fake Rucio is down")
            raise RucioDown("Rucio unavailable: fake Rucio is down")
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

    def register(self, registrations: Sequence[Registration]) -> None:
        self._enter("register")
        for g in registrations:  # validate the whole call first: Rucio refuses it as a unit
            self._registrable(g)
        for g in registrations:
            if g.rse is not None:  # else: attach only
                self._add(g.rse, g.replicas)
            self.datasets[(g.scope, g.dataset)].update((r.scope, r.name) for r in g.replicas)

    def _add(self, rse: str, replicas: Sequence[NewReplica]) -> None:
        for r in replicas:
            self.created.setdefault((r.scope, r.name), self.clock())
            self.files.setdefault((r.scope, r.name), FileMeta(r.scope, r.name, r.bytes, r.adler32))
            self.pfns.setdefault((rse, r.scope, r.name), r.pfn)
            if r.meta and (r.scope, r.name) not in self.meta:
                self.meta[(r.scope, r.name)] = dict(r.meta)

    def _registrable(self, g: Registration) -> None:
        if g.rse is not None and g.rse not in self.prefixes:
            raise RucioRefused(f"RSENotFound: RSE {g.rse!r} does not exist")
        if (g.scope, g.dataset) not in self.datasets:
            raise RucioRefused(f"DataIdentifierNotFound: {g.scope}:{g.dataset}")
        if (g.scope, g.dataset) in self.closed:
            raise RucioRefused(f"UnsupportedOperation: Data identifier '{g.scope}:{g.dataset}' is closed")
        if g.rse is None:  # attach only: the files must exist
            for r in g.replicas:
                if (r.scope, r.name) not in self.files:
                    raise RucioRefused(f"DataIdentifierNotFound: {r.scope}:{r.name}")
            return
        for r in g.replicas:
            self._scope(r.scope)
            if not r.pfn.startswith(self.prefixes[g.rse]):
                raise RucioRefused(f"RSEFileNameNotSupported: {r.pfn} is not under {self.prefixes[g.rse]}")
            known = self.files.get((r.scope, r.name))
            if known is not None and (known.bytes, known.adler32) != (r.bytes, r.adler32):
                raise ChecksumConflict(f"FileConsistencyMismatch: size/adler32 mismatch for '{r.scope}:{r.name}': "
                                       f"{r.bytes}/{r.adler32} != {known.bytes}/{known.adler32}")

    def add_dataset(self, scope: str, name: str, rules: Sequence[Rule]) -> bool:
        self._enter("add_dataset")
        self._scope(scope)
        if (scope, name) in self.datasets:
            return False
        self.datasets[(scope, name)] = set()
        self.created[(scope, name)] = self.clock()
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
                raise ReplicaGone(f"ReplicaNotFound: {scope}:{name} at {rse}")
        self.tombstoned.update((rse, scope, name) for scope, name, rse in replicas)

    def marks(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        self._enter("marks")
        return {d: dict(self.meta.get(d, {})) for d in dids if d in self.files}

    def mark(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        self._enter("mark")
        for scope, name, meta in items:
            if (scope, name) not in self.files and (scope, name) not in self.datasets:
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


    # RucioInspector: what the reconciler and status read.

    def list_files(self, scope: str, pattern: str, created_after: datetime | None = None) -> list[str]:
        self._enter("list_files")
        return sorted(n for s, n in self.files if s == scope and fnmatchcase(n, pattern)
                      and (created_after is None or self.created.get((s, n), self.clock()) >= created_after))

    def dataset_states(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DatasetState]:
        self._enter("dataset_states")
        out = {}
        for d in dids:
            if d in self.datasets:
                m = self.meta.get(d, {})
                out[d] = DatasetState(d[0], d[1], d not in self.closed, self.created.get(d),
                                      m.get("injector_finished"), tuple(m.get("injector_unattached") or ()))
        return out

    def list_datasets(self, scope: str, pattern: str) -> list[str]:
        self._enter("list_datasets")
        return sorted(n for s, n in self.datasets if s == scope and fnmatchcase(n, pattern))

    def content(self, scope: str, dataset: str) -> set[tuple[str, str]]:
        self._enter("content")
        return set(self.datasets.get((scope, dataset), set()))

    def parents(self, scope: str, name: str) -> list[tuple[str, str]]:
        self._enter("parents")
        return sorted(ds for ds, files in self.datasets.items() if (scope, name) in files)

    def rules_of(self, scope: str, name: str) -> list[dict[str, Any]]:
        self._enter("rules_of")
        return [r.record() for r in self.rules if (r.scope, r.name) == (scope, name)]

    def rules_for_file(self, scope: str, name: str) -> list[dict[str, Any]]:
        self._enter("rules_for_file")
        holders = {(scope, name)} | {ds for ds, files in self.datasets.items() if (scope, name) in files}
        return [r.record() for r in self.rules if (r.scope, r.name) in holders]

    def rule_locks(self, rule_id: str) -> list[dict[str, Any]]:
        self._enter("rule_locks")
        return [dict(lock) for lock in self.lock_table if lock["rule_id"] == rule_id]

    def rse_info(self, rse: str) -> dict[str, Any]:
        self._enter("rse_info")
        delete = {"read": 1, "write": 1, "delete": 1}
        info: dict[str, Any] = {"rse": rse, "availability_delete": True, "attributes": {},
                                "protocols": [{"scheme": "file", "hostname": "localhost",
                                               "domains": {"lan": delete, "wan": delete}}]}
        return {**info, **self.rse_settings.get(rse, {})}

    def transfers_from(self, source: str, destination: str) -> set[tuple[str, str]]:
        self._enter("transfers_from")
        return {(s, n) for src, dst, s, n in self.in_flight if (src, dst) == (source, destination)}

    def boost_rule(self, rule_id: str) -> None:
        self._enter("boost_rule")
        self.boosted.append(rule_id)

    def stuck_locks(self, rule_id: str) -> list[dict[str, Any]]:
        self._enter("stuck_locks")
        return [{**lk, "attempts": len(self.transfer_history.get((lk["scope"], lk["name"], lk["rse"]), []))}
                for lk in self.lock_table if lk["rule_id"] == rule_id and lk.get("state") == "STUCK"]

    def past_transfer(self, scope: str, name: str, rse: str) -> dict[str, Any]:
        self._enter("past_transfer")
        return dict((self.transfer_history.get((scope, name, rse)) or [{}])[0])

    # Closed datasets and the start-up checks.

    def datasets_open(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        self._enter("datasets_open")
        return {d: d not in self.closed for d in dids if d in self.datasets}

    def find_rse(self, rse: str) -> dict[str, Any] | None:
        """A source RSE (in `prefixes`): non-deterministic, one file protocol over its prefix; an RSE known only
        from `rse_settings` (e.g. an archive): deterministic; `rse_settings` overrides either."""
        self._enter("find_rse")
        if rse not in self.prefixes and rse not in self.rse_settings:
            return None
        url = urlparse(self.prefixes.get(rse, "file://localhost/"))
        write = {"read": 1, "write": 1, "delete": 1}
        protocol = {"scheme": url.scheme, "hostname": url.hostname or "", "port": url.port or 0,
                    "prefix": url.path or "/", "domains": {"lan": write, "wan": write}}
        info = {"rse": rse, "deterministic": rse not in self.prefixes, "availability_write": True,
                "availability_delete": True, "attributes": {}, "protocols": [protocol]}
        return {**info, **self.rse_settings.get(rse, {})}

    def scope_names(self) -> frozenset[str]:
        self._enter("scope_names")
        return frozenset(self.scopes)

    def account_info(self) -> AccountInfo:
        self._enter("account_info")
        return self.account

    def add_lock(self, rule: FakeRule, scope: str, name: str, rse: str, state: str = "OK") -> None:
        """Test set-up: a replica lock of `rule` (a locked replica cannot be tombstoned)."""
        self.lock_table.append({"scope": scope, "name": name, "rse": rse, "state": state, "rule_id": rule.id})
        self.locked.add((rse, scope, name))


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
    handed_back: list[Delivery] = field(default_factory=list)
    published: list[Outgoing] = field(default_factory=list)
    dead_letters: list[Outgoing] = field(default_factory=list)
    refuse_publish: bool = False

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.acked.extend(deliveries)

    def requeue(self, deliveries: Sequence[Delivery]) -> None:
        self.requeued.extend(deliveries)

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        self.handed_back.extend(deliveries)

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
