"""`rucio-injector status`: where every file of every stream is, read from Rucio, plus the queues."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from consumers.cleanup import missing_destinations
from consumers.reconcile import dataset_pattern, files_of
from injector import marks, topology
from injector.config import Settings
from injector.gateway import ClientGateway

STAGES = ("registered", "replicating", "replicated", "released", "archived", "stuck", "source-lost",
          "dead-lettered")


def file_stage(settings: Settings, stream: Any, reps: Any, file_marks: dict[str, Any],
               rucio: ClientGateway) -> str:
    """One file's stage (besides `registered`, which every file is)."""
    lacking = missing_destinations(stream, reps, rucio)
    at_source = stream.source_rse in reps.states
    if at_source:
        if lacking:
            return "replicating"
        return "released" if file_marks.get(marks.RELEASED_AT) else "replicated"
    return "source-lost" if lacking else "archived"


def collect(settings: Settings, rucio: ClientGateway, streams: Sequence[str] = (),
            night: str | None = None) -> dict[str, Any]:
    """Counts per stream and dataset; `stuck` counts replicating files of datasets with a STUCK rule."""
    out: dict[str, Any] = {"streams": {}}
    dead = dead_lettered(settings)
    for stream in settings.streams:
        if streams and stream.name not in streams:
            continue
        stuck_datasets = {f"{stream.scope}:{d}" for d in rucio.list_datasets(stream.scope, dataset_pattern(stream))
                          if any(r.get("state") == "STUCK" for r in rucio.rules_of(stream.scope, d))}
        per: dict[str, Counter[str]] = defaultdict(Counter)
        for f in files_of(stream, rucio):
            dataset = str(f.marks.get(marks.DATASET) or "(no dataset recorded)")
            if night and night not in dataset:
                continue
            if f.replicas is None:
                continue
            stage = file_stage(settings, stream, f.replicas, f.marks, rucio)
            per[dataset]["registered"] += 1
            per[dataset][stage] += 1
            if stage == "replicating" and dataset in stuck_datasets:
                per[dataset]["stuck"] += 1
        for dataset, n in dead.get(stream.name, {}).items():
            if not night or night in dataset:
                per[dataset]["dead-lettered"] += n
        out["streams"][stream.name] = {ds: {s: c.get(s, 0) for s in STAGES} for ds, c in sorted(per.items())}
    out["dead_letters_without_stream"] = dead.get("(none)", {})
    out["queues"] = queue_depths(settings)
    return out


def dead_lettered(settings: Settings) -> dict[str, dict[str, int]]:
    """file-closed events in the ingest dead-letter queue, per stream and dataset (peeked, not consumed).
    Events that match no stream are counted under the stream "(none)" by reason."""
    from consumers.dlq import RabbitDlq
    from injector.errors import Permanent
    from injector.events import decode_file_closed
    from injector.streams import place

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    try:
        records = RabbitDlq(settings.broker).peek(topology.dead_letter_queue(settings.ingest.queue))
    except Exception:  # no broker or no queue: queue_depths says so
        return {}
    for r in records:
        try:
            p = place(settings.streams, decode_file_closed(r.body))
            counts[p.stream.name][f"{p.scope}:{p.dataset}"] += 1
        except Permanent:
            counts["(none)"][f"({r.reason})"] += 1
    return {k: dict(v) for k, v in counts.items()}


def queue_depths(settings: Settings) -> dict[str, dict[str, int] | str]:
    """Ready messages and consumers of every queue of the topology (RabbitMQ), or why not."""
    from injector.transport import connection

    try:
        conn = connection(settings.broker)
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


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="files per stage (from Rucio)")
    table.add_column("stream")
    table.add_column("dataset")
    for s in STAGES:
        table.add_column(s, justify="right")
    for stream, datasets in data["streams"].items():
        if not datasets:
            table.add_row(stream, "-", *["0"] * len(STAGES))
        for ds, counts in datasets.items():
            table.add_row(stream, ds, *(str(counts[s]) for s in STAGES))
    console.print(table)
    queues = Table(title="queues (RabbitMQ)")
    queues.add_column("queue")
    queues.add_column("ready", justify="right")
    queues.add_column("consumers", justify="right")
    for name, q in data["queues"].items():
        if isinstance(q, dict):
            queues.add_row(name, str(q["messages"]), str(q["consumers"]))
        else:
            queues.add_row(name, q, "")
    console.print(queues)
