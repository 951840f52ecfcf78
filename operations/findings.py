"""What the reconciler finds, and the diagnoses naming why Rucio has not finished something by itself.

The causes are the conditions Rucio 41's daemons check (judge-cleaner, reaper), read through the API:
a rule past its lifetime is kept while it is locked, waits for a child rule or is not OK; the reaper skips an
RSE with availability_delete false or without a usable delete protocol (an empty hostname gives "No default
delete protocol"), never deletes a replica that holds a lock or is the source of a transfer in flight, and
without greedy mode (reaper option or RSE attribute greedyDeletion) deletes only epoch tombstones.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from injector import clock
from injector.config import Stream
from injector.gateway import FileReplicas, RucioInspector

Did = tuple[str, str]


@dataclass(frozen=True)
class Finding:
    """One thing a sweep did or found. `action`: done (changed Rucio or published), would (dry run),
    report (needs a person; `fix` says what --fix would do, if anything)."""

    stream: str
    kind: str
    subject: str
    detail: str
    action: str = "report"
    fix: str = ""

    def line(self) -> str:
        tail = f" [--fix: {self.fix}]" if self.fix and self.action == "report" else ""
        return f"{self.action:<6} {self.kind:<22} {self.subject}  {self.detail}{tail}"


def findings_json(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]


def needs_a_person(findings: Sequence[Finding]) -> bool:
    return any(f.action == "report" for f in findings)


def print_text(findings: Sequence[Finding], dry_run: bool = False) -> None:
    """One line per finding on stdout, a summary on stderr (for people and cron mails)."""
    for f in findings:
        print(f"{f.stream:<14} {f.line()}", flush=True)
    counts = Counter(f"{f.action} {f.kind}" for f in findings)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to do"
    print(f"reconcile{' (dry run)' if dry_run else ''}: {summary}", file=sys.stderr, flush=True)


def print_json(findings: Sequence[Finding]) -> None:
    """One JSON list of findings per sweep, on one line."""
    print(json.dumps(findings_json(findings)), flush=True)


def diagnose_rule(stream: str, label: str, r: dict[str, Any], now: datetime) -> Finding | None:
    """A rule that will not finish or go away by itself, with its likely cause; None for a healthy one."""
    rid, state = str(r.get("id")), str(r.get("state") or "")
    expires = parse_time(r.get("expires_at"), f"rule {r.get('id')} expires_at")
    base = f"rule {rid} on {r.get('rse_expression')} x{r.get('copies')}, state {state}"
    if expires is not None and expires < now:
        causes = []
        if r.get("locked"):
            causes.append("the rule is locked: the judge-cleaner never deletes locked rules (unlock it)")
        if r.get("child_rule_id"):
            causes.append(f"it waits for its child rule {r['child_rule_id']} to be OK")
        if state != "OK":
            causes.append(f"state {state}: an expired rule that is not OK keeps waiting for its locks")
        if not causes:
            causes.append("the judge-cleaner is not running (or is behind); a rule deleted through the API is "
                          "only soft-deleted: its lifetime is set to 1 h and it lingers until then")
        return Finding(stream, "rule-expired", label, f"{base}, remaining lifetime {span(expires - now)} "
                       f"(expired at {expires:%Y-%m-%d %H:%M:%S} UTC): " + "; ".join(causes))
    if state == "STUCK":
        return Finding(stream, "rule-stuck", label, f"{base}: {r.get('error') or 'transfers keep failing'} "
                       f"(locks stuck {r.get('locks_stuck_cnt', '?')}, ok {r.get('locks_ok_cnt', '?')})",
                       fix="boost the rule (the judge retries its stuck locks now)")
    if state == "SUSPENDED":
        return Finding(stream, "rule-suspended", label, f"{base}: suspended by an operator or by Rucio after "
                       f"repeated failures ({r.get('error') or 'no error recorded'}); once the cause is fixed, set its "
                       f"state to STUCK (update_replication_rule {{'state': 'STUCK'}}) so the judge-repairer retries "
                       f"it")
    return None


def stuck_files(stream: Stream, rule: dict[str, Any], rucio: RucioInspector) -> list[Finding]:
    """The files behind a STUCK rule, one finding each: where it is stuck, after how many attempts, the transfer
    error Rucio recorded, and whether the source is still on disk (`source_on_disk`)."""
    stuck = rucio.stuck_locks(str(rule.get("id")))
    dids = sorted({(str(lk["scope"]), str(lk["name"])) for lk in stuck})
    reps = rucio.replicas(dids) if dids else {}
    out = []
    for lk in stuck:
        did, rse = (str(lk["scope"]), str(lk["name"])), str(lk.get("rse"))
        error = rucio.past_transfer(*did, rse).get("err_msg") or "none recorded"
        out.append(Finding(stream.name, "transfer-stuck", f"{did[0]}:{did[1]}",
                           f"lock STUCK at {rse} (rule {rule.get('id')}) after {lk.get('attempts')} attempt(s); "
                           f"transfer error: {error}; {source_on_disk(stream, reps.get(did))}"))
    return out


def source_on_disk(stream: Stream, files: FileReplicas | None) -> str:
    """Whether the source file is on disk, when its PFN is a local file:// path this host can see."""
    pfns = files.pfns.get(stream.source_rse, []) if files is not None else []
    if not pfns:
        return f"Rucio holds no source replica at {stream.source_rse}"
    url = urlparse(pfns[0])
    if url.scheme != "file":
        return f"source {pfns[0]} not checked (not a local file:// path)"
    if os.path.exists(url.path):
        return f"the source {url.path} exists on disk"
    if not os.path.isdir(stream.storage_root):
        return f"source {url.path} not checked: {stream.storage_root} is not visible from this host"
    return (f"the source {url.path} is GONE from disk although Rucio lists it at {stream.source_rse}: restore the "
            f"file, or declare the replica bad")


@dataclass
class SourceDoctor:
    """Why the reaper has not deleted released source replicas. Reads each RSE, each destination's transfers
    and each rule's locks once per sweep."""

    rucio: RucioInspector
    _info: dict[str, dict[str, Any]] = field(default_factory=dict)
    _transfers: dict[str, set[Did]] = field(default_factory=dict)
    _locks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def info(self, rse: str) -> dict[str, Any]:
        if rse not in self._info:
            self._info[rse] = self.rucio.rse_info(rse)
        return self._info[rse]

    def rse_causes(self, rse: str) -> list[str]:
        """Causes that block every deletion at the RSE (nothing done per file can help)."""
        return _rse_causes(rse, self.info(rse))

    def file_causes(self, stream: Stream, did: Did) -> list[str]:
        """Causes that keep this one replica: locks on it, transfers reading from it."""
        rse, causes = stream.source_rse, []
        for rule in self.rucio.rules_for_file(*did):
            rid = str(rule.get("id"))
            if rid not in self._locks:
                self._locks[rid] = self.rucio.rule_locks(rid)
            if any(lk.get("rse") == rse and (lk.get("scope"), lk.get("name")) == did for lk in self._locks[rid]):
                causes.append(f"rule {rid} ({rule.get('rse_expression')}, state {rule.get('state')}) holds a lock "
                              f"on the source replica at {rse}: the reaper never deletes a locked replica")
        for dst in sorted({r for rule in stream.rules for r in self.rucio.rses(rule.rse_expression)} - {rse}):
            if dst not in self._transfers:
                self._transfers[dst] = self.rucio.transfers_from(rse, dst)
            if did in self._transfers[dst]:
                causes.append(f"a transfer to {dst} still reads from it: the reaper skips transfer sources")
        return causes

    def unexplained(self, rse: str) -> str:
        greedy = bool((self.info(rse).get("attributes") or {}).get("greedyDeletion"))
        mode = "greedy (RSE attribute greedyDeletion)" if greedy else (
            "not greedy: a reaper without --greedy deletes only epoch tombstones there")
        return (f"no cause visible from the API; RSE {rse} is {mode}. The release set an epoch tombstone: check that "
                f"a reaper runs for {rse}, that a judge-evaluator backlog does not pause it, and that nobody reset "
                f"the tombstone (--fix sets it again)")


def _rse_causes(rse: str, info: dict[str, Any]) -> list[str]:
    causes = []
    if not info.get("availability_delete", True):
        causes.append(f"RSE {rse} has availability_delete false: the reaper skips it")
    # As the reaper chooses: the WAN delete protocol of best priority; its hostname names the storage to delete on.
    wan = [p for p in info.get("protocols") or [] if ((p.get("domains") or {}).get("wan") or {}).get("delete")
           is not None]
    if not wan:
        causes.append(f"RSE {rse} has no WAN delete protocol: the reaper logs \"No default delete protocol\" and "
                      f"deletes nothing there")
    else:
        best = min(wan, key=lambda p: p["domains"]["wan"]["delete"])
        if not best.get("hostname"):
            causes.append(f"RSE {rse}: its delete protocol ({best.get('scheme')}) has an empty hostname: the reaper "
                          f"logs \"No default delete protocol\" and deletes nothing there")
    return causes


def parse_time(value: Any, what: str = "time") -> datetime | None:
    """A time as Rucio's client returns it (naive UTC datetime, ISO or RFC 1123 text), aware in UTC; None when
    absent. Read by `injector.clock` (bad text is a BadTime naming `what`)."""
    if value is None or value == "":
        return None
    return clock.parse(value if isinstance(value, datetime) else str(value), what)


def span(delta: timedelta) -> str:
    """-1h02m03s"""
    sign = "-" if delta < timedelta(0) else ""
    seconds = int(abs(delta.total_seconds()))
    return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
