"""The reconciler: finish from Rucio's state whatever events were lost, and explain what it cannot finish.

One sweep, per stream, reads Rucio (the source of truth) and:
  * releases sources whose archive copies are verified safe (the same check as cleanup) but were never
    released (a transfer-done that was lost);
  * publishes file-archived for files gone from the source that were never announced (a deletion-done
    that was lost); the archive time is decided once and kept on the file, so a repeat is byte-identical;
  * repairs files registered but not attached to their dataset, and datasets missing a stream rule
    (with --fix);
  * diagnoses sources released longer than the grace period ago that the reaper has not deleted, and
    rules that are STUCK, SUSPENDED or past their lifetime, naming the likely cause.
Nothing is released without the verification; --dry-run changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers.cleanup import archived_message, decided_archived_at, missing_destinations
from injector import marks
from injector.config import Settings, Stream
from injector.errors import Permanent, Transient
from injector.events import FileArchived
from injector.gateway import ClientGateway, FileReplicas, chunks
from injector.messages import Outgoing
from injector.settle import Outcome

log = logging.getLogger(__name__)

Did = tuple[str, str]
Publish = Callable[[Sequence[Outgoing]], None]


@dataclass(frozen=True)
class Finding:
    """One thing the sweep did or found. `action`: done (changed Rucio or published), would (dry run),
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


@dataclass
class FileState:
    did: Did
    replicas: FileReplicas | None
    marks: dict[str, Any]


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    fix: bool = False
    grace: timedelta = timedelta(hours=1)


def stream_pattern(stream: Stream) -> str:
    """A Rucio name wildcard covering the stream's file names."""
    if stream.did_name == "path":
        return f"{stream.did_prefix}{stream.storage_root.rstrip('/')}/*"
    return f"{stream.did_prefix}*"


def dataset_pattern(stream: Stream) -> str:
    """The dataset template with every field as a wildcard: LST1_{night}_raw → LST1_*_raw."""
    import re

    return re.sub(r"\{[^}]*\}", "*", stream.dataset)


def files_of(stream: Stream, rucio: ClientGateway) -> Iterator[FileState]:
    """Every file of the stream known to Rucio, with its replicas and the project's marks."""
    names = rucio.list_files(stream.scope, stream_pattern(stream))
    for part in chunks([(stream.scope, n) for n in names], 1000):
        reps = rucio.replicas(part)
        meta = rucio.marks(part)
        for did in part:
            m = meta.get(did, {})
            if m.get(marks.STREAM, stream.name) == stream.name:  # another stream may share the scope and root
                yield FileState(did, reps.get(did), m)


def sweep(settings: Settings, rucio: ClientGateway, publish: Publish, options: Options,
          streams: Sequence[str] = (), now: datetime | None = None) -> list[Finding]:
    now = now or datetime.now(UTC)
    findings: list[Finding] = []
    for stream in settings.streams:
        if streams and stream.name not in streams:
            continue
        try:
            findings += _sweep_stream(stream, settings, rucio, publish, options, now)
        except (Permanent, Transient) as exc:
            findings.append(Finding(stream.name, "sweep-failed", stream.name, str(exc)))
    return findings


def _sweep_stream(stream: Stream, settings: Settings, rucio: ClientGateway, publish: Publish, options: Options,
                  now: datetime) -> list[Finding]:
    out: list[Finding] = []
    release: list[FileState] = []
    announce: list[FileState] = []
    attached: dict[str, set[Did]] = {}
    for f in files_of(stream, rucio):
        label = f"{f.did[0]}:{f.did[1]}"
        reps = f.replicas
        if reps is None:
            continue
        lacking = missing_destinations(stream, reps, rucio)
        at_source = stream.source_rse in reps.states  # (its PFN may not match: e.g. a changed protocol)
        if at_source and not lacking and stream.release_source:
            released_at = _time(f.marks.get(marks.RELEASED_AT))
            if released_at is None:
                release.append(f)
            elif now - released_at > options.grace:
                out.append(Finding(stream.name, "source-not-deleted", label,
                                   f"released {now - released_at} ago; " + _why_not_deleted(stream, f, rucio)))
        elif not at_source and not lacking and not f.marks.get(marks.ANNOUNCED) and stream.release_source:
            announce.append(f)
        dataset = str(f.marks.get(marks.DATASET) or "")
        if dataset:
            if dataset not in attached:
                scope, _, name = dataset.partition(":")
                attached[dataset] = rucio.content(scope, name)
            if f.did not in attached[dataset]:
                out.append(_attach(stream, f, dataset, rucio, options))
    out += _release(stream, release, rucio, options, now)
    out += _announce(stream, settings, announce, rucio, publish, options, now)
    out += _rules(stream, rucio, options, now)
    return out


def _release(stream: Stream, files: list[FileState], rucio: ClientGateway, options: Options,
             now: datetime) -> list[Finding]:
    out = []
    for part in chunks(files, 1000):
        labels = [f"{f.did[0]}:{f.did[1]}" for f in part]
        if options.dry_run:
            out += [Finding(stream.name, "release-source", lb, "archive verified; would release", "would")
                    for lb in labels]
            continue
        rucio.set_tombstones([(f.did[0], f.did[1], stream.source_rse) for f in part])
        rucio.mark([(f.did[0], f.did[1], {marks.RELEASED_AT: now.isoformat()}) for f in part])
        out += [Finding(stream.name, "release-source", lb, "archive verified; source released (lost "
                        "transfer-done)", "done") for lb in labels]
    return out


def _announce(stream: Stream, settings: Settings, files: list[FileState], rucio: ClientGateway, publish: Publish,
              options: Options, now: datetime) -> list[Finding]:
    out = []
    for part in chunks(files, 500):
        if options.dry_run:
            out += [Finding(stream.name, "announce-archived", f"{f.did[0]}:{f.did[1]}", "would publish "
                            "file-archived", "would") for f in part]
            continue
        meta = rucio.file_metadata([f.did for f in part])
        messages = []
        for f in part:
            m = meta.get(f.did)
            reps = f.replicas
            if m is None or m.bytes is None or m.adler32 is None or reps is None:
                continue
            archived_at = decided_archived_at(rucio, f.did, now)
            destinations = sorted(r for rule in stream.rules for r in rucio.rses(rule.rse_expression)
                                  if reps.available(r))
            event = FileArchived.create(
                site=stream.site, instrument=stream.instrument, path=str(f.marks.get(marks.PATH) or f.did[1]),
                size=m.bytes, adler32=m.adler32, scope=f.did[0], name=f.did[1], destinations=destinations,
                archived_at=archived_at)
            messages.append((f, archived_message(event, settings)))
        publish([msg for _, msg in messages])  # confirmed before the files are marked announced
        rucio.mark([(f.did[0], f.did[1], {marks.ANNOUNCED: now.isoformat()}) for f, _ in messages])
        out += [Finding(stream.name, "announce-archived", f"{f.did[0]}:{f.did[1]}",
                        "source gone, archive verified: file-archived published (lost deletion-done)", "done")
                for f, _ in messages]
    return out


def _attach(stream: Stream, f: FileState, dataset: str, rucio: ClientGateway, options: Options) -> Finding:
    label = f"{f.did[0]}:{f.did[1]}"
    if not options.fix or options.dry_run:
        return Finding(stream.name, "not-attached", label, f"registered but not attached to {dataset}",
                       "would" if options.dry_run and options.fix else "report", f"attach it to {dataset}")
    from injector.gateway import Attachment

    scope, _, name = dataset.partition(":")
    rucio.add_dataset(scope, name, stream.rules)
    rucio.attach([Attachment(scope, name, (f.did,))])
    return Finding(stream.name, "not-attached", label, f"attached to {dataset}", "done")


def _rules(stream: Stream, rucio: ClientGateway, options: Options, now: datetime) -> list[Finding]:
    out = []
    for dataset in rucio.list_datasets(stream.scope, dataset_pattern(stream)):
        label = f"{stream.scope}:{dataset}"
        rules = rucio.rules_of(stream.scope, dataset)
        have = {(r["rse_expression"], int(r["copies"])) for r in rules}
        for want in stream.rules:
            if (want.rse_expression, want.copies) not in have:
                if options.fix and not options.dry_run:
                    rucio.add_rule(stream.scope, dataset, want)
                    out.append(Finding(stream.name, "rule-missing", label, f"added {want.rse_expression} "
                                       f"x{want.copies}", "done"))
                else:
                    out.append(Finding(stream.name, "rule-missing", label, f"no rule {want.rse_expression} "
                                       f"x{want.copies}", "would" if options.fix else "report",
                                       "add the stream's rule"))
        for r in rules:
            finding = diagnose_rule(stream.name, label, r, now)
            if finding is None:
                continue
            if finding.kind == "rule-stuck" and options.fix:
                if not options.dry_run:
                    rucio.boost_rule(str(r["id"]))
                finding = Finding(finding.stream, finding.kind, finding.subject, finding.detail + "; boosted",
                                  "would" if options.dry_run else "done")
            out.append(finding)
    return out


def diagnose_rule(stream: str, label: str, r: dict[str, Any], now: datetime) -> Finding | None:
    """A rule that will not finish or go away by itself, with its likely cause; None for a healthy one."""
    rid, state = str(r.get("id")), str(r.get("state") or "")
    expires = _time(r.get("expires_at"))
    base = f"rule {rid} on {r.get('rse_expression')} x{r.get('copies')}, state {state}"
    if expires is not None and expires < now:
        left = expires - now
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
        return Finding(stream, "rule-expired", label, f"{base}, remaining lifetime {_span(left)}: "
                       + "; ".join(causes))
    if state == "STUCK":
        return Finding(stream, "rule-stuck", label, f"{base}: {r.get('error') or 'transfers keep failing'} "
                       f"(locks stuck {r.get('locks_stuck_cnt', '?')}, ok {r.get('locks_ok_cnt', '?')})",
                       fix="boost the rule (retry its stuck locks now)")
    if state == "SUSPENDED":
        return Finding(stream, "rule-suspended", label, f"{base}: suspended by an operator or by Rucio after "
                       f"repeated failures ({r.get('error') or 'no error recorded'}); re-enable it with "
                       f"`rucio rule update --suspend false`-style tooling once the cause is fixed")
    return None


def _why_not_deleted(stream: Stream, f: FileState, rucio: ClientGateway) -> str:
    """Why the reaper has not deleted a released source replica: the first causes that apply."""
    rse = stream.source_rse
    info = rucio.rse_info(rse)
    causes = []
    if not info.get("availability_delete", True):
        causes.append(f"RSE {rse} has availability_delete false: the reaper skips it")
    protocols = info.get("protocols") or []
    deleters = [p for p in protocols
                if any((p.get("domains") or {}).get(d, {}).get("delete") for d in ("lan", "wan"))]
    if protocols and not deleters:
        causes.append(f"RSE {rse} has no protocol with a delete priority")
    if any(not p.get("hostname") for p in deleters or protocols):
        causes.append(f"RSE {rse} has a protocol with an empty hostname: the reaper cannot build the PFN to delete")
    locks = [r for r in rucio.rules_for_file(*f.did) if rse in rucio.rses(str(r.get("rse_expression")))]
    if locks:
        causes.append("rule(s) " + ", ".join(str(r.get("id")) for r in locks)
                      + f" hold a lock on the source replica at {rse}")
    return "; ".join(causes) or (f"no cause visible from the API: check that a reaper runs for {rse} (it deletes "
                                 "epoch-tombstoned replicas, greedy or not), that the replica is not the source of a "
                                 "transfer in progress, and that nobody reset its tombstone")


def _time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).replace("Z", "+00:00")
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        try:
            t = datetime.strptime(str(value), "%a, %d %b %Y %H:%M:%S %Z")
        except ValueError:
            return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _span(delta: timedelta) -> str:
    sign = "-" if delta < timedelta(0) else ""
    seconds = int(abs(delta.total_seconds()))
    return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def as_outcome(f: Finding) -> Outcome:
    return Outcome.done(f"{f.action}:{f.kind}", f.subject)


def findings_json(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]


def run(settings: Settings, options: Options, streams: Sequence[str], every: float | None,
        report: Callable[[list[Finding]], None], stop: threading.Event, metrics: Any = None) -> list[Finding]:
    """One sweep, or one every `every` seconds until `stop`; returns the last sweep's findings."""
    from injector.transport import Publisher, connection

    rucio = ClientGateway(settings.rucio, observe=metrics.observe_rucio if metrics else None)
    conn = None
    publisher: Publisher | None = None

    def publish(messages: Sequence[Outgoing]) -> None:
        nonlocal conn, publisher
        if not messages:
            return
        if publisher is None:
            conn = connection(settings.broker)
            publisher = Publisher(conn)
        publisher.publish(messages)

    try:
        while True:
            started = time.monotonic()
            findings = sweep(settings, rucio, publish, options, streams)
            report(findings)
            if metrics is not None:
                metrics.heartbeat()
                metrics.observe_batch([as_outcome(f) for f in findings], time.monotonic() - started)
            if every is None or stop.wait(every):
                return findings
    finally:
        if conn is not None:
            conn.release()
