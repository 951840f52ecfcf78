"""The Rucio gateway: the only code that talks to Rucio.

`RucioGateway` is the interface handlers use; `ClientGateway` implements it with rucio-clients
(auth from the usual rucio-clients config, RUCIO_CONFIG), retries passing faults with tenacity
(bounded, jittered) and turns Rucio's exceptions into the project's error tree.
`injector.testing.FakeRucio` implements the same interface in memory for unit tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import requests
from rucio.common import exception as rx
from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from injector import clock
from injector import marks as _marks
from injector.breaker import Breaker
from injector.config import RucioSettings, Rule
from injector.errors import (
    ChecksumConflict,
    Permanent,
    PermissionDenied,
    ReplicaGone,
    RucioDown,
    RucioFailed,
    RucioRefused,
    RucioUnavailable,
    Transient,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
RSE_CACHE_SECONDS = 300.0
MARK_PREFIX = "injector_"  # the project's own DID metadata keys
# A DID column no metadata plugin but DID_COLUMN answers: in a plugin="JSON" bulk answer it means the server
# ignored the plugin (Rucio before the fix of rucio/rucio#7323, e.g. 38 LTS) and answered the DID table's row.
DID_COLUMN_KEY = "did_type"

# Two processes inserting the same new DID or replica at once: one loses with one of these.
# The retry finds the row and skips it, so they are passing, not permanent.
RACES: tuple[type[Exception], ...] = (rx.Duplicate, rx.DataIdentifierAlreadyExists, rx.FileAlreadyExists,
                                      rx.FileReplicaAlreadyExists, rx.DuplicateContent)
DENIED: tuple[type[Exception], ...] = (rx.AccessDenied, rx.ScopeAccessDenied, rx.RSEAccessDenied,
                                       rx.CannotAuthorize)
# What an outage looks like from the client: nothing answered, the answer came too late, or the server
# (or a proxy in front of it) answered with a 5xx and no specific exception. Whether it IS an outage,
# the breaker's health probe decides.
SUSPECT: tuple[type[BaseException], ...] = (
    rx.ServerConnectionException, rx.DatabaseException, rx.ServiceUnavailable, rx.ResourceTemporaryUnavailable,
    rx.ReplicationRuleCreationTemporaryFailed, rx.CannotAuthenticate, rx.TransferToolTimeout,
    requests.RequestException, OSError)
# rucio-clients' own configuration (RUCIO_CONFIG) is missing or incomplete: a person fixes it, no retry will.
CLIENT_CONFIG: tuple[type[Exception], ...] = (rx.ConfigLoadingError, rx.ConfigNotFound, rx.MissingClientParameter,
                                              rx.NoAuthInformation)


@dataclass(frozen=True, slots=True)
class FileMeta:
    scope: str
    name: str
    bytes: int | None
    adler32: str | None


@dataclass(frozen=True, slots=True)
class FileReplicas:
    """A file and the state of each of its replicas (rse → AVAILABLE, COPYING, BEING_DELETED, ...)."""

    scope: str
    name: str
    bytes: int | None
    adler32: str | None
    states: dict[str, str]
    pfns: dict[str, list[str]]

    def available(self, rse: str) -> bool:
        return self.states.get(rse) == "AVAILABLE"


@dataclass(frozen=True, slots=True)
class DatasetState:
    """A dataset as a sweep needs it: open or closed, when it was created, and the project's `injector_finished`
    mark (the number of files it held when every one was finished; None: not finished) and `injector_unattached`
    (files recorded for it that a sweep found registered but not attached)."""

    scope: str
    name: str
    is_open: bool
    created_at: datetime | None
    finished: int | None
    unattached: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NewReplica:
    scope: str
    name: str
    bytes: int
    adler32: str
    pfn: str
    md5: str | None = None
    meta: tuple[tuple[str, str], ...] = ()  # custom DID metadata set in the same call


@dataclass(frozen=True, slots=True)
class Registration:
    """Files to register in place at `rse` and attach to a dataset, in one transaction. `rse` None: files Rucio
    holds already, only attached (their replicas are never added again: one reaped stays gone)."""

    scope: str
    dataset: str
    rse: str | None
    replicas: tuple[NewReplica, ...]


@dataclass(frozen=True, slots=True)
class Attachment:
    scope: str
    dataset: str
    files: tuple[tuple[str, str], ...]  # (scope, name)


class RucioGateway(Protocol):
    """What the consumers need from Rucio. `breaker` says whether Rucio as a whole answers (injector.breaker)."""

    breaker: Breaker

    def file_metadata(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FileMeta]:
        """Size and adler32 of those DIDs that exist."""
        ...

    def register(self, registrations: Sequence[Registration]) -> None:
        """Register replicas in place at their RSE and attach them to their dataset, all or nothing: a closed or
        missing dataset, or a name Rucio holds with another size or adler32, refuses the whole call; replicas and
        attachments that exist are left as they are."""
        ...

    def add_dataset(self, scope: str, name: str, rules: Sequence[Rule]) -> bool:
        """Create a dataset with its rules in one call; False when it already existed."""
        ...

    def dataset_rules(self, scope: str, name: str) -> list[tuple[str, int]]:
        """(rse_expression, copies) of the rules on a DID."""
        ...

    def add_rule(self, scope: str, name: str, rule: Rule) -> bool:
        """Add one rule; False when an identical rule exists."""
        ...

    def attach(self, attachments: Sequence[Attachment]) -> None:
        """Attach files to datasets; attaching twice is harmless."""
        ...

    def replicas(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FileReplicas]:
        """Every replica, in every state, of the DIDs that exist."""
        ...

    def rses(self, expression: str) -> frozenset[str]:
        """The RSEs an RSE expression names."""
        ...

    def set_tombstones(self, replicas: Sequence[tuple[str, str, str]]) -> None:
        """Mark (scope, name, rse) replicas for immediate deletion by the reaper."""
        ...

    def marks(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The project's own DID metadata (injector_*) of those DIDs that exist."""
        ...

    def mark(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Set the project's own DID metadata: (scope, name, {key: value})."""
        ...

    def content(self, scope: str, dataset: str) -> set[tuple[str, str]]:
        """The files attached to a dataset (empty while it does not exist)."""
        ...

    def datasets_open(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Whether each dataset that exists is open (a closed dataset refuses attachments); one bulk call."""
        ...


class RucioInspector(RucioGateway, Protocol):
    """What the reconciler and `status` also need: reading Rucio's state (and boosting a rule)."""

    def list_files(self, scope: str, pattern: str, created_after: datetime | None = None) -> list[str]:
        """Names of the files in `scope` matching a wildcard pattern (Rucio's `*`), only those created after
        `created_after` when given."""
        ...

    def list_datasets(self, scope: str, pattern: str) -> list[str]:
        ...

    def dataset_states(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DatasetState]:
        """Open or closed, created when, and the finished mark, of those datasets that exist; one bulk call."""
        ...

    def rules_of(self, scope: str, name: str) -> list[dict[str, Any]]:
        """Full rule records of a DID (id, state, expires_at, locked, child_rule_id, error, ...)."""
        ...

    def parents(self, scope: str, name: str) -> list[tuple[str, str]]:
        """The datasets (and containers) a DID is attached to."""
        ...

    def rules_for_file(self, scope: str, name: str) -> list[dict[str, Any]]:
        """Every rule that covers a file (also through its datasets)."""
        ...

    def rule_locks(self, rule_id: str) -> list[dict[str, Any]]:
        """The replica locks of a rule: scope, name, rse, state (OK, REPLICATING, STUCK)."""
        ...

    def rse_info(self, rse: str) -> dict[str, Any]:
        """An RSE's settings (availability_delete, ...), with `attributes` and `protocols`."""
        ...

    def transfers_from(self, source: str, destination: str) -> set[tuple[str, str]]:
        """Files with a transfer in flight (submitted, not finished) from `source` to `destination`."""
        ...

    def boost_rule(self, rule_id: str) -> None:
        """Ask the judge to retry a rule's stuck locks now."""
        ...

    def stuck_locks(self, rule_id: str) -> list[dict[str, Any]]:
        """A rule's STUCK locks (Rucio's rule analysis): scope, name, rse, attempts, last_time."""
        ...

    def past_transfer(self, scope: str, name: str, rse: str) -> dict[str, Any]:
        """One finished transfer request of a file to an RSE from Rucio's history (err_msg, state); {} if none."""
        ...


class RucioPreflight(Protocol):
    """What the start-up checks (`injector.preflight`) read: RSEs, scopes and the account's rights."""

    breaker: Breaker

    def rses(self, expression: str) -> frozenset[str]:
        ...

    def find_rse(self, rse: str) -> dict[str, Any] | None:
        """An RSE's settings (deterministic, availability_write, ...) with `attributes` and `protocols`;
        None when no such RSE exists."""
        ...

    def scope_names(self) -> frozenset[str]:
        ...

    def account_info(self) -> AccountInfo:
        ...


def classify(exc: BaseException) -> Exception:
    """Map anything a rucio-clients call raised onto the project's error tree. RucioFailed means "could be an
    outage": the caller asks the breaker's probe before believing it is this request's problem."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, rx.FileConsistencyMismatch):
        return ChecksumConflict(text)
    if isinstance(exc, DENIED):
        return PermissionDenied(text)
    if isinstance(exc, RACES):
        return RucioUnavailable(f"concurrent insert, will retry: {text}")
    if isinstance(exc, SUSPECT) or type(exc) is rx.RucioException:  # a bare RucioException: a 5xx without a class
        return RucioFailed(text)
    if isinstance(exc, rx.ReplicaNotFound):
        return ReplicaGone(text)
    if isinstance(exc, rx.RucioException):
        return RucioRefused(text)
    return RucioFailed(text)  # not Rucio's own: a client-side surprise, treated like an unexplained failure


def not_found(exc: BaseException) -> bool:
    return isinstance(exc, rx.DataIdentifierNotFound)


class ClientGateway:
    """RucioGateway over rucio-clients, behind the process's circuit breaker."""

    def __init__(self, settings: RucioSettings, client: Any | None = None,
                 observe: Callable[[str, float, str], None] | None = None,
                 factory: Callable[[], Any] | None = None, breaker: Breaker | None = None) -> None:
        self._settings = settings
        self._client = client
        self._factory = factory  # builds the rucio client lazily (default: rucio.client.Client())
        self._observe = observe  # (operation, seconds, outcome) → metrics
        self._rse_cache: dict[str, tuple[float, frozenset[str]]] = {}
        # Does the server honour plugin= in get_metadata_bulk? None until an answer tells (then set once): Rucio
        # before the fix of rucio/rucio#7323 answers the DID columns only, whatever the plugin.
        self.bulk_plugin: bool | None = None
        self._bulk_plugin_lock = threading.Lock()
        self.breaker = breaker or Breaker(self.probe, first=settings.probe_first, cap=settings.probe_cap)

    def _new_client(self) -> Any:
        import rucio.client.baseclient  # noqa: F401 - sets up its logger, which is quietened next

        # rucio-clients logs an ERROR line for every refused connection, probes included; the breaker
        # reports an outage once when it starts and once when it ends. Its logger also carries a stderr handler of
        # its own (ANSI colours): what it still says goes through ours only, once, in our format.
        client_log = logging.getLogger("baseclient")
        client_log.handlers.clear()
        client_log.propagate = True
        client_log.setLevel(logging.CRITICAL)
        if self._factory is None:
            from rucio.client import Client

            timeout = self._settings.timeout
            self._factory = lambda: Client(timeout=timeout)
        return self._factory()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._call("connect", self._new_client)
        return self._client

    def probe(self) -> None:
        """The breaker's health probe: the server answers an authenticated call (token, database, account)."""
        if self._client is None:
            self._client = self._new_client()
        self._client.whoami()

    def _call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call Rucio through the breaker. A concurrent-insert race is retried here (bounded, jittered); a failure
        that could be an outage is checked with the health probe: RucioDown when Rucio as a whole is down (the
        breaker opens; later calls fail fast until it closes), RucioFailed when it is this call's problem."""
        if self.breaker.open:
            raise RucioDown(f"Rucio unavailable since {self.breaker.since:%H:%M:%S}: {self.breaker.reason}")

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("rucio %s lost a race (attempt %d/%d), retrying: %s", operation, state.attempt_number,
                     self._settings.retry_attempts, exc)

        @retry(
            retry=retry_if_exception(lambda e: isinstance(e, RucioUnavailable) and not isinstance(e, RucioFailed)),
            stop=stop_after_attempt(self._settings.retry_attempts),
            wait=wait_random_exponential(multiplier=0.2, max=self._settings.retry_max_wait),
            before_sleep=log_retry,
            reraise=True,
        )
        def attempt() -> T:
            started = time.perf_counter()
            outcome = "ok"
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                mapped = classify(exc)
                if isinstance(mapped, RucioFailed) and not self.breaker.healthy():
                    mapped = RucioDown(f"Rucio unavailable: {mapped}")
                outcome = type(mapped).__name__
                raise mapped from exc
            finally:
                if self._observe:
                    self._observe(operation, time.perf_counter() - started, outcome)

        return attempt()

    def _metadata(self, dids: Sequence[tuple[str, str]], **kwargs: Any) -> list[dict[str, Any]]:
        """get_metadata_bulk of the DIDs that exist (Rucio answers an all-missing batch with an error)."""
        if not dids:
            return []
        request = [{"scope": s, "name": n} for s, n in dids]

        def fetch() -> list[dict[str, Any]]:
            try:
                return list(self.client.get_metadata_bulk(request, **kwargs))
            except Exception as exc:
                if not_found(exc):
                    return []
                raise

        return self._call("get_metadata_bulk", fetch)

    def file_metadata(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FileMeta]:
        return {(r["scope"], r["name"]): FileMeta(r["scope"], r["name"], r.get("bytes"), r.get("adler32"))
                for r in self._metadata(dids)}

    def register(self, registrations: Sequence[Registration]) -> None:
        # Rucio's attach with an RSE (add_files_to_datasets): the replicas are added in the same transaction, and
        # the sizes and checksums compared with any DID of the same name (FileConsistencyMismatch).
        body = [{"scope": g.scope, "name": g.dataset, "rse": g.rse, "dids": [_replica_dict(r) for r in g.replicas]}
                if g.rse else {"scope": g.scope, "name": g.dataset,
                               "dids": [{"scope": r.scope, "name": r.name} for r in g.replicas]}
                for g in registrations]
        self._call("add_files_to_datasets", self.client.add_files_to_datasets, body, ignore_duplicate=True)

    def add_dataset(self, scope: str, name: str, rules: Sequence[Rule]) -> bool:
        def create() -> None:  # the server wants the rule owner spelled out in a rule given with add_dataset
            owner = self.client.account
            self.client.add_dataset(scope, name, rules=[{**_rule_dict(r), "account": owner} for r in rules])

        return self._call("add_dataset", _created, rx.DataIdentifierAlreadyExists, create)

    def dataset_rules(self, scope: str, name: str) -> list[tuple[str, int]]:
        rows = self._call("list_did_rules", lambda: list(self.client.list_did_rules(scope, name)))
        return [(r["rse_expression"], int(r["copies"])) for r in rows]

    def add_rule(self, scope: str, name: str, rule: Rule) -> bool:
        return self._call("add_replication_rule", _created, rx.DuplicateRule, lambda: self.client.add_replication_rule(
            [{"scope": scope, "name": name}], rule.copies, rule.rse_expression,
            grouping=rule.grouping, lifetime=rule.lifetime, activity=rule.activity))

    def attach(self, attachments: Sequence[Attachment]) -> None:
        body = [
            {"scope": a.scope, "name": a.dataset, "dids": [{"scope": s, "name": n} for s, n in a.files]}
            for a in attachments
        ]
        self._call("add_files_to_datasets", self.client.add_files_to_datasets, body, ignore_duplicate=True)


    def replicas(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FileReplicas]:
        if not dids:
            return {}
        request = [{"scope": s, "name": n} for s, n in dids]
        rows = self._call("list_replicas", lambda: list(self.client.list_replicas(request, all_states=True)))
        return {(r["scope"], r["name"]): FileReplicas(r["scope"], r["name"], r.get("bytes"), r.get("adler32"),
                                                     dict(r.get("states") or {}), dict(r.get("rses") or {}))
                for r in rows}

    def rses(self, expression: str) -> frozenset[str]:
        cached = self._rse_cache.get(expression)
        if cached and time.monotonic() - cached[0] < RSE_CACHE_SECONDS:
            return cached[1]
        names = frozenset(r["rse"] for r in self._call("list_rses", lambda: list(self.client.list_rses(expression))))
        self._rse_cache[expression] = (time.monotonic(), names)
        return names

    def set_tombstones(self, replicas: Sequence[tuple[str, str, str]]) -> None:
        body = [{"scope": s, "name": n, "rse": r} for s, n, r in replicas]
        self._call("set_tombstone", self.client.set_tombstone, body)

    def marks(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The project's JSON metadata of the DIDs that exist: one bulk read, or, on a server that ignores plugin=
        in bulk reads, one read per DID (never inherit=True: a file's marks must not hold its datasets' keys)."""
        if self.bulk_plugin is False:
            found = self._json_by_did(dids)
        else:
            rows = self._metadata(dids, plugin="JSON")
            if self._honours_plugin(rows):
                found = {(r["scope"], r["name"]): r for r in rows}
            else:  # the rows are the DID columns of the DIDs that exist: read their JSON metadata one by one
                found = self._json_by_did([(r["scope"], r["name"]) for r in rows])
        return {did: _own(meta) for did, meta in found.items()}

    def _honours_plugin(self, json_rows: Sequence[dict[str, Any]]) -> bool:
        """Learn from a plugin="JSON" bulk answer whether the server honours plugin= (once per gateway): an empty
        answer tells nothing; rows carrying DID columns came from a server that ignored it."""
        if self.bulk_plugin is None and json_rows:
            self._learn_bulk_plugin(not any(DID_COLUMN_KEY in r for r in json_rows))
        return self.bulk_plugin is not False

    def _learn_bulk_plugin(self, honoured: bool) -> None:
        with self._bulk_plugin_lock:
            if self.bulk_plugin is not None:
                return
            self.bulk_plugin = honoured
        if not honoured:
            log.warning("the Rucio server ignores plugin= in bulk metadata reads (rucio/rucio#7323), so marks are "
                        "read one DID at a time")

    def _json_by_did(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The JSON metadata read DID by DID (get_metadata honours plugin= on every server); DIDs that do not exist
        are left out."""
        def fetch(scope: str, name: str) -> dict[str, Any] | None:
            try:
                return dict(self.client.get_metadata(scope, name, plugin="JSON"))
            except Exception as exc:
                if not_found(exc):
                    return None
                raise

        found: dict[tuple[str, str], dict[str, Any]] = {}
        for scope, name in dict.fromkeys(dids):
            meta = self._call("get_metadata", fetch, scope, name)
            if meta is not None:
                found[(scope, name)] = meta
        return found

    def mark(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        if items:
            body = [{"scope": s, "name": n, "meta": meta} for s, n, meta in items]
            self._call("set_dids_metadata_bulk", self.client.set_dids_metadata_bulk, body)

    # Inspection for the reconciler and status (read-only unless named otherwise).

    def list_files(self, scope: str, pattern: str, created_after: datetime | None = None) -> list[str]:
        """Names of the files in `scope` matching a wildcard pattern (Rucio's `*`); with `created_after`, only
        those created since (Rucio's created_after filter: the server reads the DID rows, the client gets the
        recent names only)."""
        where: dict[str, Any] = {"name": pattern}
        if created_after is not None:
            where["created_after"] = created_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return self._call("list_dids", lambda: list(self.client.list_dids(scope, [where], did_type="file")))

    def list_datasets(self, scope: str, pattern: str) -> list[str]:
        return self._call("list_dids", lambda: list(self.client.list_dids(scope, [{"name": pattern}],
                                                                          did_type="dataset")))

    def dataset_states(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DatasetState]:
        """One plugin="ALL" bulk read (the DID columns and the JSON metadata) on a server that honours plugin=; on
        one that does not (rucio/rucio#7323) the DID columns in bulk and the JSON metadata DID by DID, merged."""
        rows = self._metadata(dids, plugin="ALL")
        if rows and self.bulk_plugin is None:
            if any(k.startswith(MARK_PREFIX) for r in rows for k in r):
                self._learn_bulk_plugin(True)  # JSON keys in a bulk answer: an old server never sends them
            else:  # no marks, or a server that dropped them: a plugin="JSON" read of the same DIDs tells which
                self._honours_plugin(self._metadata(dids, plugin="JSON"))
        if self.bulk_plugin is False:
            meta = self._json_by_did([(r["scope"], r["name"]) for r in rows])
            rows = [{**meta[did], **r} for r in rows if (did := (r["scope"], r["name"])) in meta]
        return {(r["scope"], r["name"]): _dataset_state(r) for r in rows}

    def content(self, scope: str, dataset: str) -> set[tuple[str, str]]:
        def fetch() -> set[tuple[str, str]]:
            try:
                return {(d["scope"], d["name"]) for d in self.client.list_content(scope, dataset)}
            except Exception as exc:
                if not_found(exc):
                    return set()
                raise

        return self._call("list_content", fetch)

    def rules_of(self, scope: str, name: str) -> list[dict[str, Any]]:
        """Full rule records of a DID (state, expires_at, locked, child_rule_id, error, ...)."""
        return self._call("list_did_rules", lambda: list(self.client.list_did_rules(scope, name)))

    def parents(self, scope: str, name: str) -> list[tuple[str, str]]:
        rows = self._call("list_parent_dids", lambda: list(self.client.list_parent_dids(scope, name)))
        return [(str(r["scope"]), str(r["name"])) for r in rows]

    def rules_for_file(self, scope: str, name: str) -> list[dict[str, Any]]:
        """Every rule holding locks on a file (also through its datasets)."""
        return self._call("list_associated_rules_for_file",
                          lambda: list(self.client.list_associated_rules_for_file(scope, name)))

    def rule_locks(self, rule_id: str) -> list[dict[str, Any]]:
        return self._call("list_replica_locks", lambda: list(self.client.list_replica_locks(rule_id)))

    def transfers_from(self, source: str, destination: str) -> set[tuple[str, str]]:
        # Q/G/S/W/P: queued, submitting, submitted, waiting, preparing. Only a submitted request names its source.
        rows = self._call("list_requests", lambda: list(self.client.list_requests(source, destination, "Q,G,S,W,P")))
        return {(str(r["scope"]), str(r["name"])) for r in rows}

    def rse_info(self, rse: str) -> dict[str, Any]:
        info = dict(self._call("get_rse", self.client.get_rse, rse))
        info["attributes"] = dict(self._call("list_rse_attributes", self.client.list_rse_attributes, rse))

        def protocols() -> list[dict[str, Any]]:
            try:
                return list(self.client.get_protocols(rse))
            except Exception as exc:
                if isinstance(exc, rx.RSEProtocolNotSupported):
                    return []
                raise

        info["protocols"] = self._call("get_protocols", protocols)
        return info

    def boost_rule(self, rule_id: str) -> None:
        """Ask the judge to retry a rule's stuck locks now (Rucio's `boost_rule`)."""
        self._call("update_replication_rule", self.client.update_replication_rule, rule_id, {"boost_rule": True})

    def stuck_locks(self, rule_id: str) -> list[dict[str, Any]]:
        return self._call("examine_replication_rule",
                          lambda: list(self.client.examine_replication_rule(rule_id).get("transfers") or []))

    def past_transfer(self, scope: str, name: str, rse: str) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            try:
                return dict(self.client.list_request_history_by_did(name, rse, scope=scope))
            except Exception as exc:
                if not_found(exc):
                    return {}
                raise
        return self._call("list_request_history_by_did", fetch)

    # Closed datasets (ingest, reconcile, status) and the start-up checks (injector.preflight).

    def datasets_open(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        return {(r["scope"], r["name"]): bool(r.get("is_open", True)) for r in self._metadata(dids)}

    def find_rse(self, rse: str) -> dict[str, Any] | None:
        def exists() -> bool:
            try:
                self.client.get_rse(rse)
            except Exception as exc:
                if isinstance(exc, rx.RSENotFound):
                    return False
                raise
            return True

        return self.rse_info(rse) if self._call("get_rse", exists) else None

    def scope_names(self) -> frozenset[str]:
        return frozenset(self._call("list_scopes", lambda: list(self.client.list_scopes())))

    def _scopes_of(self, account: str) -> list[str]:
        try:
            return list(self.client.list_scopes_for_account(account))
        except rx.ScopeNotFound:  # Rucio's answer for an account that owns no scope (rights may come from admin)
            return []

    def account_info(self) -> AccountInfo:
        name = str(self._call("whoami", self.client.whoami)["account"])
        rows = self._call("list_account_attributes", lambda: list(self.client.list_account_attributes(name)))
        # rucio-clients 41 yields one list holding every attribute; older ones yield the attributes.
        flat = [a for row in rows for a in (row if isinstance(row, list) else [row])]
        admin = name == "root" or any(a.get("key") == "admin" and str(a.get("value")).lower() == "true" for a in flat)
        owned = self._call("list_scopes_for_account", lambda: self._scopes_of(name))
        limits = self._call("get_local_account_limits", self.client.get_local_account_limits, name)
        usage = self._call("get_local_account_usage", lambda: list(self.client.get_local_account_usage(name)))
        return AccountInfo(name, admin, frozenset(owned), {str(k): float(v) for k, v in limits.items()},
                           {str(u["rse"]): int(u.get("bytes") or 0) for u in usage})


def _created(exists: type[Exception], create: Callable[[], object]) -> bool:
    """Create something Rucio refuses to create twice: True when this call made it, False when it already was."""
    try:
        create()
    except exists:
        return False
    return True


def _own(meta: dict[str, Any]) -> dict[str, Any]:
    """The project's own keys of a DID's metadata."""
    return {k: v for k, v in meta.items() if k.startswith(MARK_PREFIX)}


def _dataset_state(row: dict[str, Any]) -> DatasetState:
    """get_metadata_bulk(plugin=ALL) of a dataset: the DID columns and the JSON metadata in one record."""
    created = row.get("created_at")  # Rucio's times are naive UTC
    finished, unattached = row.get(_marks.FINISHED), row.get(_marks.UNATTACHED)
    return DatasetState(row["scope"], row["name"], bool(row.get("is_open", True)),
                        clock.parse(created, f"{row['scope']}:{row['name']} created_at") if created else None,
                        finished if isinstance(finished, int) and not isinstance(finished, bool) else None,
                        tuple(str(n) for n in unattached) if isinstance(unattached, list) else ())


def _replica_dict(r: NewReplica) -> dict[str, Any]:
    d: dict[str, Any] = {"scope": r.scope, "name": r.name, "bytes": r.bytes, "adler32": r.adler32, "pfn": r.pfn}
    if r.md5:
        d["md5"] = r.md5
    if r.meta:
        d["meta"] = dict(r.meta)
    return d


def _rule_dict(rule: Rule) -> dict[str, Any]:
    d: dict[str, Any] = {"copies": rule.copies, "rse_expression": rule.rse_expression,
                         "activity": rule.activity, "grouping": rule.grouping}
    if rule.lifetime is not None:
        d["lifetime"] = rule.lifetime
    return d


def isolate(items: Sequence[T], call: Callable[[Sequence[T]], None]) -> list[tuple[T, Permanent | Transient]]:
    """Run a bulk call; if Rucio refuses it (or fails it while healthy: RucioFailed), split until the failing
    items are isolated, so one bad item never fails its good neighbours. Returns the failed items; any other
    transient fault (an outage, a lost race) fails them all."""
    try:
        call(items)
        return []
    except (Permanent, RucioFailed) as exc:
        if len(items) == 1:
            return [(items[0], exc)]
        mid = len(items) // 2
        return isolate(items[:mid], call) + isolate(items[mid:], call)
    except Transient as exc:
        return [(item, exc) for item in items]


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """The Rucio account ingest runs as, as far as the start-up checks need it."""

    name: str
    admin: bool  # root, or the account attribute admin=True: Rucio skips quota and most permission checks
    scopes: frozenset[str]  # the scopes it owns
    limits: dict[str, float]  # RSE → local account limit in bytes (inf: unlimited)
    usage: dict[str, int]  # RSE → bytes the account's rules use there
