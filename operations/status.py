"""`rucio-injector status`: where every file of every stream is, read from Rucio, plus the queues.

It reads what a reconcile sweep reads (`operations.inventory.open_work`): a finished dataset is counted from its
mark (every file archived) without listing its files; `--full` reads every file instead."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers.cleanup import verify
from injector import marks, topology
from injector.config import Settings, StompServer, Stream
from injector.gateway import FileReplicas, RucioInspector
from operations.inventory import WINDOW, Inventory, everything, open_work
from operations.orphans import Orphans

Did = tuple[str, str]
# Every file is `registered` and in exactly one of the stages after it; `stuck` counts the replicating ones
# whose lock is STUCK; `dead-lettered` counts file-closed events in the ingest dead-letter queue.
# `announcing`: source gone, archive verified, file-archived not sent yet; `archived`: and announced. An `orphaned`
# file (registered, never attached: its dataset is closed) counts there only, not as a file of the dataset.
STAGES = ("registered", "replicating", "replicated", "released", "announcing", "archived", "source-lost", "stuck",
          "dead-lettered", "orphaned")


def file_stage(stream: Stream, reps: FileReplicas, file_marks: dict[str, Any], rucio: RucioInspector) -> str:
    """One file's stage (besides `registered`, which every file is). An announced file is archived: it was
    announced only after its archive was verified and its source was gone (its replicas are not read again)."""
    if file_marks.get(marks.ANNOUNCED):
        return "archived"
    safe = verify(stream, reps, rucio).safe
    if stream.source_rse in reps.states:
        if not safe:
            return "replicating"
        return "released" if file_marks.get(marks.RELEASED_AT) else "replicated"
    if not safe:
        return "source-lost"
    # Not announced yet: cleanup's deletion-done or, after the grace period, the reconciler will send it.
    return "archived" if file_marks.get(marks.ANNOUNCED) else "announcing"


def stuck_files(datasets: Sequence[Did], rucio: RucioInspector) -> set[Did]:
    """Files holding a STUCK lock of a rule on one of these datasets."""
    out: set[Did] = set()
    for scope, dataset in datasets:
        for rule in rucio.rules_of(scope, dataset):
            if int(rule.get("locks_stuck_cnt") or 0) or rule.get("state") == "STUCK":
                out |= {(str(lk["scope"]), str(lk["name"])) for lk in rucio.rule_locks(str(rule["id"]))
                        if lk.get("state") == "STUCK"}
    return out


def collect(settings: Settings, rucio: RucioInspector, streams: Sequence[str] = (), night: str | None = None,
            since: datetime | None = None, full: bool = False, window: timedelta = WINDOW,
            now: datetime | None = None) -> dict[str, Any]:
    """Counts per stream and dataset (the dataset recorded on each file by ingest), and the queues. `night`: only
    datasets whose name holds it; `since`: only datasets created since then; `full`: read every file."""
    out: dict[str, Any] = {"streams": {}}
    dead = dead_lettered(settings)
    now = now or datetime.now(UTC)
    for stream in settings.selected_streams(streams):
        inv = everything(stream, rucio, announced=True) if full else open_work(stream, rucio, now, window,
                                                                                announced=True)
        per = _counts(stream, inv, rucio, dead.get(stream.name, {}), _Shown(inv, night, since))
        out["streams"][stream.name] = {ds: {s: c.get(s, 0) for s in STAGES} for ds, c in sorted(per.items())}
    out["dead_letters_without_stream"] = dead.get("(none)", {})
    out["queues"] = queue_depths(settings)
    out["broker"] = "activemq" if settings.broker.transport == "stomp" else "rabbitmq"
    waiting = outbox_depth(settings)
    if waiting is not None:
        out["outbox"] = waiting
    c = settings.cleanup
    if c.flavour == "activemq":
        out["activemq_queues"] = browsed_depths(c.server, [c.consumer_queue,
                                                           topology.dead_letters_of(settings, c.consumer_queue)])
    return out


@dataclass(frozen=True)
class _Shown:
    """Whether a dataset ("scope:name") is shown: its name holds `night`, and it was created since `since`."""

    inv: Inventory
    night: str | None
    since: datetime | None

    def __call__(self, dataset: str) -> bool:
        scope, _, name = dataset.partition(":")
        state = self.inv.datasets.get((scope, name))
        young = self.since is None or state is None or state.created_at is None or state.created_at >= self.since
        return (not self.night or self.night in dataset) and young


def _counts(stream: Stream, inv: Inventory, rucio: RucioInspector, dead: dict[str, int],
            shown: _Shown) -> dict[str, Counter[str]]:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    final = "archived" if stream.release_source else "replicated"
    for (scope, name), n in inv.finished.items():  # every file finished: counted from the mark
        if shown(f"{scope}:{name}"):
            per[f"{scope}:{name}"].update({"registered": n, final: n})
    stuck = stuck_files([d for d in inv.open if shown(f"{d[0]}:{d[1]}")], rucio)
    orphans = Orphans(rucio)
    for f in inv.files:
        ds = f.dataset or f.recorded
        dataset = f"{ds[0]}:{ds[1]}" if ds else "(in no dataset)"
        if not shown(dataset):
            continue
        if orphans.is_orphan(f):
            per[dataset]["orphaned"] += 1
            continue
        stage = file_stage(stream, f.replicas, f.marks, rucio)
        per[dataset]["registered"] += 1
        per[dataset][stage] += 1
        if stage == "replicating" and f.did in stuck:
            per[dataset]["stuck"] += 1
    for dataset, n in dead.items():
        if shown(dataset):
            per[dataset]["dead-lettered"] += n
    return per


def dead_lettered(settings: Settings) -> dict[str, dict[str, int]]:
    """file-closed events in the ingest dead-letter queue, per stream and dataset (peeked, not consumed).
    Events that match no stream are counted under the stream "(none)" by reason."""
    from injector.errors import Permanent
    from injector.events import decode_file_closed
    from injector.streams import place
    from operations.dlq import dlq_for

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    dlq = topology.dead_letters_of(settings, settings.ingest.queue)
    try:
        records = dlq_for(settings, dlq).peek(dlq)
    except Exception:  # no broker or no queue: queue_depths says so
        return {}
    for r in records:
        try:
            p = place(settings.streams, decode_file_closed(r.body))
            counts[p.stream.name][f"{p.scope}:{p.dataset}"] += 1
        except Permanent:
            counts["(none)"][f"({r.reason})"] += 1
    return {k: dict(v) for k, v in counts.items()}


def outbox_depth(settings: Settings) -> dict[str, Any] | None:
    """The DAQ outbox of this host (`[outbox] path`): events waiting for the broker; None when there is no such
    file here (status run away from the DAQ host)."""
    from producers.outbox import depth_of  # the DAQ side's file, read only

    try:
        events = depth_of(settings.outbox)
    except Exception as exc:  # unreadable: say so, show the rest
        return {"path": settings.outbox.file, "events": f"unreadable: {exc}"}
    return None if events is None else {"path": settings.outbox.file, "events": events}


def queue_depths(settings: Settings, attempts: int | None = None) -> dict[str, dict[str, int] | str]:
    """Ready messages and consumers of every queue of the topology (RabbitMQ), or why not. An ActiveMQ-only site:
    the messages of the ingest queue, its DLQ and the archived queue, browsed. `attempts`: connection attempts
    (default [broker] connect_attempts)."""
    from injector.transport.amqp import connection

    if settings.broker.transport == "stomp":
        work = settings.ingest.queue
        return browsed_depths(settings.broker.stomp, [work, topology.dead_letters_of(settings, work),
                                                      topology.archived_queue(settings)])
    try:
        conn = connection(settings.broker, attempts)
    except Exception as exc:  # status must still show Rucio's side
        return {"error": f"broker unreachable: {exc}"}  # type: ignore[dict-item]
    depths: dict[str, dict[str, int] | str] = {}
    try:
        for q in topology.declare(settings).queues:
            try:
                ok = conn.channel().queue_declare(q.name, passive=True)
                depths[q.name] = {"messages": int(ok.message_count), "consumers": int(ok.consumer_count)}
            except Exception as exc:
                depths[q.name] = f"missing ({type(exc).__name__}); run `rucio-injector broker setup`"
    finally:
        conn.release()
    return depths


def browsed_depths(server: StompServer, queues: Sequence[str]) -> dict[str, dict[str, int] | str]:
    """Messages in ActiveMQ queues, counted by browsing over STOMP (nothing consumed), or why not."""
    from injector.errors import BrokerUnavailable
    from operations.dlq import ActiveMqDlq

    activemq = ActiveMqDlq(server)
    depths: dict[str, dict[str, int] | str] = {}
    for queue in queues:
        try:
            depths[queue] = {"messages": activemq.depth(queue)}
        except BrokerUnavailable as exc:  # status must still show the rest
            return {"error": f"ActiveMQ unreachable: {str(exc).rstrip(': ')}"}
        except Exception as exc:
            depths[queue] = f"not browsable: {type(exc).__name__}: {exc}"
    return depths


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or mailed: no terminal width to fit, keep every column whole
        console.width = max(console.width, 200)
    for stream, datasets in data["streams"].items():
        table = Table(title=f"stream {escape(stream)}: files per stage (from Rucio)")
        table.add_column("dataset", no_wrap=True)
        for s in STAGES:
            table.add_column(s, justify="right")
        for ds, counts in datasets.items():
            table.add_row(escape(ds), *(str(counts[s]) for s in STAGES))
        if not datasets:
            table.add_row("(no files)", *["0"] * len(STAGES))
        console.print(table)
    if data.get("broker") == "activemq":
        console.print(_queue_table("queues (ActiveMQ, browsed over STOMP)", data["queues"], ("messages",)))
    else:
        console.print(_queue_table("queues (RabbitMQ)", data["queues"], ("ready", "consumers")))
    if "activemq_queues" in data:
        console.print(_queue_table("Rucio's events (ActiveMQ, browsed over STOMP)", data["activemq_queues"],
                                   ("messages",)))
    if "outbox" in data:
        box = data["outbox"]
        console.print(f"outbox (this host) {escape(box['path'])}: {box['events']} event(s) waiting for the broker")


def _queue_table(title: str, depths: dict[str, Any], columns: tuple[str, ...]) -> Any:
    """One row per queue with its counts, or with why they are unknown (the broker unreachable: one row)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    table.add_column("queue")
    for c in columns:
        table.add_column(c, justify="right")
    keys = {"ready": "messages"}  # RabbitMQ's ready messages
    for name, q in depths.items():
        if isinstance(q, dict):
            table.add_row(escape(name), *(str(q[keys.get(c, c)]) for c in columns))
        else:
            table.add_row(escape(name), escape(q), *[""] * (len(columns) - 1))
    return table
