"""The reconciler: finish from Rucio's state whatever events were lost, and name what it cannot finish.

One sweep, per stream, reads Rucio (the source of truth) and:
  * releases sources whose archive copies are verified safe but were never released (a lost transfer-done),
    with cleanup's own verification (`consumers.cleanup.verify`) and release (`consumers.cleanup.release`);
  * publishes file-archived for files whose source is gone, archive verified, never announced, released more
    than the grace period ago (a lost deletion-done);
  * reports, and with --fix repairs, files registered but not attached to their dataset and datasets
    missing a stream rule (what ingest would have done);
  * diagnoses sources released longer than the grace period ago that the reaper has not deleted, sources
    gone without a verified archive, and rules that are STUCK, SUSPENDED or past their lifetime.
Nothing is released without the verification; --dry-run changes nothing and publishes nothing.
A sweep reads the stream's open work, not its history (`operations.inventory.open_work`); after it, the datasets
whose every file is finished are marked so later sweeps skip them (`operations.inventory.record`).

"Never announced", without a database: Rucio keeps the answer on the file (DID metadata
`injector_announced`). The reconciler sets it only after the broker confirmed the file-archived; cleanup sets
it when it takes a deletion-done, whose unacked message then carries the announcement until the broker
confirmed it (a crash redelivers the deletion-done). The archive time is decided once and stored BEFORE
publishing (`injector_archived_at`), and the event id derives from scope:name, so a repeat after a crash
between confirm and mark is the identical event, which a DAQ deduplicating on event_id ignores.
The archived queue cannot answer the question: the DAQ consumes it, and other DAQs bind their own queues.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers import transfer_failures
from consumers.announcement import archive_times, archived_event, archived_message
from consumers.cleanup import release, verify
from injector import marks
from injector.config import RUCIO_BULK, Settings, Stream
from injector.errors import BrokerUnavailable, InjectorError, Permanent, PublishFailed, ReplicaGone, Transient
from injector.gateway import Attachment, RucioInspector, chunks
from injector.messages import Outgoing
from injector.streams import path_of
from operations.findings import Finding, SourceDoctor, diagnose_rule, parse_time, span, stuck_files
from operations.inventory import WINDOW, FileState, Inventory, everything, is_finished, open_work, record
from operations.orphans import orphan_findings

log = logging.getLogger(__name__)

Did = tuple[str, str]
Publish = Callable[[Sequence[Outgoing]], None]


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    fix: bool = False
    grace: timedelta = timedelta(hours=1)
    window: timedelta = WINDOW  # files registered this recently are looked at whatever their dataset's mark
    full: bool = False  # every file of the stream, not only the open work (an audit)


def sweep(settings: Settings, rucio: RucioInspector, publish: Publish, options: Options,
          streams: Sequence[str] = (), now: datetime | None = None) -> list[Finding]:
    """One pass over the streams; a stream Rucio cannot be read for becomes a `sweep-failed` finding."""
    now = now or datetime.now(UTC)
    findings: list[Finding] = []
    for stream in settings.selected_streams(streams):
        try:
            findings += _sweep_stream(stream, settings, rucio, publish, options, now)
        except InjectorError as exc:
            log.warning("sweep of stream %s failed: %s", stream.name, exc)
            findings.append(Finding(stream.name, "sweep-failed", stream.name, f"{type(exc).__name__}: {exc}"))
    return findings


@dataclass
class _Plan:
    inventory: Inventory
    release: list[FileState] = field(default_factory=list)
    undeleted: list[FileState] = field(default_factory=list)
    announce: list[FileState] = field(default_factory=list)
    unattached: dict[str, list[FileState]] = field(default_factory=dict)  # "scope:dataset" -> files
    unfinished: set[Did] = field(default_factory=set)  # as read: not announced (nor kept safe)
    findings: list[Finding] = field(default_factory=list)


def _sweep_stream(stream: Stream, settings: Settings, rucio: RucioInspector, publish: Publish, options: Options,
                  now: datetime) -> list[Finding]:
    plan = _plan(stream, rucio, options, now)
    out = plan.findings
    out += _release(stream, plan.release, rucio, options)
    out += _announce(stream, settings, plan.announce, rucio, publish, options, now)
    out += _attach(stream, plan.unattached, rucio, options)
    out += _undeleted(stream, plan.undeleted, rucio, options, now)
    out += _rules(stream, plan.inventory.open, rucio, options, now)
    if not options.dry_run:  # the datasets every file of which was finished when read: skipped from now on
        unattached = {(ds.partition(":")[0], ds.partition(":")[2]): {f.did for f in files}
                      for ds, files in plan.unattached.items()}
        for scope, name in record(rucio, plan.inventory, plan.unfinished, unattached):
            log.info("dataset %s:%s finished: every file archived%s; later sweeps skip it", scope, name,
                     " and announced" if stream.release_source else "")
    return out


def _plan(stream: Stream, rucio: RucioInspector, options: Options, now: datetime) -> _Plan:
    inv = everything(stream, rucio) if options.full else open_work(stream, rucio, now, options.window)
    plan = _Plan(inv)
    for f in inv.files:
        if not _place(stream, f, rucio, options, now, plan):
            plan.unfinished.add(f.did)
        recorded = f.recorded
        if recorded is not None:
            if f.did not in inv.content(recorded, rucio):
                plan.unattached.setdefault(f"{recorded[0]}:{recorded[1]}", []).append(f)
        elif f.did in inv.parentless:
            plan.unfinished.add(f.did)
            plan.findings.append(Finding(stream.name, "not-attached", f.label, f"registered at {stream.source_rse} "
                                         f"but in none of stream {stream.name}'s datasets, and no dataset is recorded "
                                         "on it: no rule archives it. Its file-closed event names the dataset: "
                                         "replay it, or attach the file by hand"))
    return plan


def _place(stream: Stream, f: FileState, rucio: RucioInspector, options: Options, now: datetime,
           plan: _Plan) -> bool:
    """Put the file where it belongs in the plan (or nowhere: in transfer, or finished); True when it is
    finished (`inventory.is_finished`)."""
    reps = f.replicas
    verdict = verify(stream, reps, rucio)  # cleanup's verification, the only one
    released = parse_time(f.marks.get(marks.RELEASED_AT), f"{f.label} {marks.RELEASED_AT}")
    # Within the grace period after a release, the reaper and cleanup's deletion-done are still on their way.
    settled = released is None or now - released > options.grace
    failing = transfer_failures.describe(f.marks.get(marks.TRANSFER_FAILURES))
    if failing and not verdict.safe:  # Rucio may still be retrying: say so instead of "nothing to do"
        plan.findings.append(Finding(stream.name, "transfer-failing", f.label, failing))
    if stream.source_rse not in reps.states:
        if not verdict.safe:
            plan.findings.append(Finding(stream.name, "source-lost", f.label, "the source replica is gone but the "
                                         f"archive is not verified: {verdict}"))
        elif not f.marks.get(marks.ANNOUNCED) and settled:
            plan.announce.append(f)
    elif verdict.safe and stream.release_source:
        if released is None:
            plan.release.append(f)
        elif settled:
            plan.undeleted.append(f)
    return is_finished(stream, f, verdict.safe)


def _release(stream: Stream, files: list[FileState], rucio: RucioInspector, options: Options) -> list[Finding]:
    if options.dry_run:
        return [Finding(stream.name, "release-source", f.label, "archive verified; would release the source",
                        "would") for f in files]
    keys = [(f.did[0], f.did[1], stream.source_rse) for f in files]
    refused = release(rucio, keys)
    out = []
    for f, key in zip(files, keys, strict=True):
        exc = refused.get(key)
        if exc is None:
            out.append(Finding(stream.name, "release-source", f.label, "archive verified; source released (its "
                               "transfer-done was lost)", "done"))
        elif isinstance(exc, ReplicaGone):
            continue  # deleted since this sweep read it: the next sweep announces it
        else:
            out.append(Finding(stream.name, "release-refused", f.label, f"archive verified, but Rucio refused the "
                               f"release: {exc}"))
    return out


def _announce(stream: Stream, settings: Settings, files: list[FileState], rucio: RucioInspector, publish: Publish,
              options: Options, now: datetime) -> list[Finding]:
    if options.dry_run:
        return [Finding(stream.name, "announce-archived", f.label, "source gone, archive verified: would publish "
                        "file-archived", "would") for f in files]
    out: list[Finding] = []
    for part in chunks(files, 500):
        times = archive_times(rucio, {f.did: f.marks for f in part}, {f.did: now for f in part})  # before publishing
        sent, messages = [], []
        for f in part:
            path = str(f.marks.get(marks.PATH) or path_of(stream, f.did[1]) or f.did[1])
            try:
                event = archived_event(stream, f.replicas, path, times[f.did], rucio)
            except Transient:  # the one check, in archived_event: Rucio holds no size or adler32
                out.append(Finding(stream.name, "announce-archived", f.label, "Rucio holds no size/adler32 for it"))
                continue
            messages.append(archived_message(event, settings))
            sent.append(f)
        try:
            publish(messages)  # returns once the broker confirmed every one
        except (PublishFailed, BrokerUnavailable) as exc:
            out += [Finding(stream.name, "announce-failed", f.label, f"{exc} (retried next sweep)") for f in sent]
            continue
        rucio.mark([(f.did[0], f.did[1], {marks.ANNOUNCED: now.isoformat()}) for f in sent])
        out += [Finding(stream.name, "announce-archived", f.label, "source gone, archive verified: file-archived "
                        "published (its deletion-done was lost)", "done") for f in sent]
    return out


def _attach(stream: Stream, unattached: dict[str, list[FileState]], rucio: RucioInspector,
            options: Options) -> list[Finding]:
    out: list[Finding] = []
    dids = {ds: (ds.partition(":")[0], ds.partition(":")[2]) for ds in unattached}
    is_open = rucio.datasets_open(list(dids.values())) if dids else {}
    for dataset, files in unattached.items():
        if not is_open.get(dids[dataset], True):  # orphans: their dataset is closed
            out += orphan_findings(stream, dids[dataset], files, rucio, options.fix, options.dry_run)
            continue
        if not options.fix or options.dry_run:
            out += [Finding(stream.name, "not-attached", f.label, f"registered but not attached to {dataset}",
                            "would" if options.fix else "report", f"attach it to {dataset}") for f in files]
            continue
        scope, _, name = dataset.partition(":")
        try:
            rucio.add_dataset(scope, name, stream.rules)  # as ingest would have: with the stream's rules
            for part in chunks(files, RUCIO_BULK):
                rucio.attach([Attachment(scope, name, tuple(f.did for f in part))])
        except Permanent as exc:
            out += [Finding(stream.name, "not-attached", f.label, f"attaching to {dataset} refused: {exc}")
                    for f in files]
            continue
        out += [Finding(stream.name, "not-attached", f.label, f"attached to {dataset}", "done") for f in files]
    return out


def _undeleted(stream: Stream, files: list[FileState], rucio: RucioInspector, options: Options,
               now: datetime) -> list[Finding]:
    """Released sources the reaper should have deleted by now: why not; --fix re-sets the epoch tombstone of
    those with no visible cause (the same release, the file passed the same verification this sweep)."""
    if not files:
        return []
    rse, doctor = stream.source_rse, SourceDoctor(rucio)
    rse_causes = doctor.rse_causes(rse)
    out, again = [], []
    for f in files:
        ago = span(now - (parse_time(f.marks.get(marks.RELEASED_AT), f"{f.label} {marks.RELEASED_AT}") or now))
        causes = rse_causes or doctor.file_causes(stream, f.did)  # an RSE-wide cause is enough
        detail = f"released {ago} ago, still at {rse}: " + ("; ".join(causes) or doctor.unexplained(rse))
        if causes or not options.fix:
            out.append(Finding(stream.name, "source-not-deleted", f.label, detail,
                               fix="" if causes else "set the epoch tombstone again"))
        elif options.dry_run:
            out.append(Finding(stream.name, "source-not-deleted", f.label, detail + "; would set it again", "would"))
        else:
            again.append(f)
    refused = release(rucio, [(f.did[0], f.did[1], rse) for f in again]) if again else {}
    for f in again:
        why = refused.get((f.did[0], f.did[1], rse))
        out.append(Finding(stream.name, "source-not-deleted", f.label, f"epoch tombstone refused: {why}" if why
                           else "epoch tombstone set again", "report" if why else "done"))
    return out


def _rules(stream: Stream, datasets: Sequence[Did], rucio: RucioInspector, options: Options,
           now: datetime) -> list[Finding]:
    """The rules of the datasets not finished (a finished one's files are all archived)."""
    out = []
    for _, dataset in datasets:
        label = f"{stream.scope}:{dataset}"
        rules = rucio.rules_of(stream.scope, dataset)
        have = {(r["rse_expression"], int(r["copies"])) for r in rules}
        for want in stream.rules:
            if (want.rse_expression, want.copies) in have:
                continue
            what = f"{want.rse_expression} x{want.copies}"
            if options.fix and not options.dry_run:
                rucio.add_rule(stream.scope, dataset, want)
                out.append(Finding(stream.name, "rule-missing", label, f"added the stream's rule {what}", "done"))
            else:
                out.append(Finding(stream.name, "rule-missing", label, f"no rule {what}",
                                   "would" if options.fix else "report", "add the stream's rule"))
        for r in rules:
            finding = diagnose_rule(stream.name, label, r, now)
            if finding is not None and finding.kind == "rule-stuck" and options.fix:
                if not options.dry_run:
                    rucio.boost_rule(str(r["id"]))
                finding = Finding(finding.stream, finding.kind, finding.subject, finding.detail + "; boosted",
                                  "would" if options.dry_run else "done")
            if finding is not None:
                out.append(finding)
            if str(r.get("state")) == "STUCK":
                out += stuck_files(stream, r, rucio)
    return out


class _Announcer:
    """Confirmed publishing to the DAQ broker (its transport's Sender), connected on first use and again after a
    failure."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sender: Any = None

    def __call__(self, messages: Sequence[Outgoing]) -> None:
        from injector.topology import Routes
        from injector.transport import sender_for

        if not messages:
            return
        if self._sender is None:
            self._sender = sender_for(self._settings.broker, Routes(self._settings))
        try:
            self._sender.publish(messages)
        except PublishFailed:
            self.close()  # the next sweep reconnects
            raise

    def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()


def run(settings: Settings, options: Options, streams: Sequence[str], every: float | None,
        report: Callable[[list[Finding]], None], stop: threading.Event,
        metrics_port: int | None = None, rucio: RucioInspector | None = None,
        publish: Publish | None = None) -> list[Finding]:
    """One sweep, or one every `every` seconds until `stop` (serving /metrics and /healthz meanwhile);
    returns the last sweep's findings. A sweep cut short by a Rucio outage is followed, in the loop, by
    another as soon as Rucio answers (the gateway's breaker probes meanwhile)."""
    from injector.gateway import ClientGateway

    settings.selected_streams(streams)  # fail fast on an unknown stream name
    metrics = _metrics(settings, every, metrics_port)
    if rucio is None:
        rucio = ClientGateway(settings.rucio, observe=metrics.observe if metrics else None)
    announce = _Announcer(settings)
    if metrics is not None:
        metrics.metrics.track_breaker(rucio.breaker)
    try:
        while True:
            started = time.monotonic()
            findings = sweep(settings, rucio, publish or announce, options, streams)
            report(findings)
            if metrics is not None:
                metrics.swept(findings, time.monotonic() - started)
            if every is None:
                return findings
            if rucio.breaker.open:  # a sweep cut short by an outage: sweep again as soon as Rucio answers
                if not rucio.breaker.wait(stop):
                    return findings
            elif stop.wait(every):
                return findings
    finally:
        announce.close()


class _SweepMetrics:
    """Metrics of `reconcile --every`: the common ones (Rucio calls, retries, findings as events), the findings
    of the last sweep by kind, when it ended, and the messages waiting in each dead-letter queue (read from the
    broker after each sweep: the one place a site's alert on a non-empty DLQ can come from). /healthz fails when
    two periods pass without a sweep."""

    def __init__(self, settings: Settings, every: float, port: int | None) -> None:
        from prometheus_client import Gauge

        from consumers.services import serve_metrics
        from injector.metrics import Metrics

        self.metrics = Metrics("reconcile", stall_seconds=2 * every + 60)
        registry = self.metrics.registry
        self.findings = Gauge("rucio_injector_reconcile_findings", "Findings of the last sweep",
                              ["stream", "kind", "action"], registry=registry)
        self.last = Gauge("rucio_injector_reconcile_last_sweep_timestamp_seconds", "When the last sweep ended",
                          registry=registry)
        self.dead_letters = Gauge("rucio_injector_dead_letter_queue_messages", "Messages in each dead-letter "
                                  "queue, as the broker counted them after the last sweep", ["queue"],
                                  registry=registry)
        self._settings = settings
        serve_metrics(self.metrics, settings.metrics.host, settings.metrics.reconcile_port if port is None else port)
        self.metrics.heartbeat()  # healthy from the start; unhealthy when no sweep ends within two periods

    def observe(self, operation: str, seconds: float, outcome: str) -> None:
        self.metrics.observe_rucio(operation, seconds, outcome)

    def swept(self, findings: Sequence[Finding], seconds: float) -> None:
        from collections import Counter

        from injector.settle import Outcome

        self.metrics.heartbeat()
        self.metrics.observe_batch([Outcome.done(f"{f.action}:{f.kind}", f.subject) for f in findings], seconds)
        self.findings.clear()
        for (stream, kind, action), n in Counter((f.stream, f.kind, f.action) for f in findings).items():
            self.findings.labels(stream, kind, action).set(n)
        self.last.set_to_current_time()
        self.count_dead_letters()

    def count_dead_letters(self) -> None:
        """The depth of each dead-letter queue of the configuration (left as it was when the broker is away)."""
        from injector import topology
        from operations.status import queue_depths

        s = self._settings
        wanted = {topology.dead_letters_of(s, s.ingest.queue), topology.dead_letters_of(s, s.cleanup.consumer_queue)}
        for queue, depth in queue_depths(s, attempts=1).items():  # a broker away must not hold up the loop
            if queue in wanted and isinstance(depth, dict):
                self.dead_letters.labels(queue).set(depth["messages"])


def _metrics(settings: Settings, every: float | None, port: int | None) -> _SweepMetrics | None:
    return None if every is None else _SweepMetrics(settings, every, port)
