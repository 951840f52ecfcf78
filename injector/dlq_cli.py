"""`rucio-injector dlq …`: the operator's view of dead letters (tables for people, JSON for scripts)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from consumers.dlq import ActiveMqDlq, RabbitDlq, dead_letter_queues, dlq_for, export_line
from injector import config
from injector.deadletter import Filter, Record, parse_duration
from injector.errors import InjectorError

err = Console(stderr=True)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dlq", help="inspect, filter, export, replay and purge dead letters")
    acts = p.add_subparsers(dest="action", required=True)

    def with_filters(a: argparse.ArgumentParser, queue: bool = True) -> argparse.ArgumentParser:
        if queue:
            a.add_argument("queue", nargs="?", help="work queue or its DLQ (default: every DLQ)")
        a.add_argument("--reason", help="only this dlq-reason (e.g. no-stream, checksum-conflict)")
        a.add_argument("--older-than", type=parse_duration, metavar="D", help="failed more than D ago (30m, 2h, 7d)")
        a.add_argument("--newer-than", type=parse_duration, metavar="D", help="failed less than D ago")
        a.add_argument("--match", action="append", default=[], metavar="FIELD=VALUE",
                       help="event field (dotted path) or header equals VALUE; repeatable")
        a.add_argument("--id", action="append", default=[], dest="ids", help="only this message id; repeatable")
        return a

    with_filters(acts.add_parser("list", help="peek (nothing is consumed), with counts per reason")).add_argument(
        "--json", action="store_true")
    show = acts.add_parser("show", help="one dead letter in full")
    show.add_argument("id")
    show.add_argument("--queue")
    exp = with_filters(acts.add_parser("export", help="write dead letters as JSON lines (nothing is consumed)"),
                       queue=False)
    exp.add_argument("file", help="output file, - for stdout")
    exp.add_argument("--queue")
    purge = with_filters(acts.add_parser("purge", help="delete dead letters for good"))
    purge.add_argument("--yes", action="store_true", help="really delete")
    rep = with_filters(acts.add_parser("replay", help="republish to the original exchange and routing key"))
    rep.add_argument("--limit", type=int)
    rep.add_argument("--rate", type=float, metavar="R", help="at most R messages per second")
    rep.add_argument("--dry-run", action="store_true", help="say what would be replayed; change nothing")
    rep.add_argument("--to", dest="routing_key", metavar="ROUTING_KEY", help="replay with this routing key")


def _filter(args: argparse.Namespace) -> Filter:
    pairs = []
    for m in args.match:
        key, sep, value = m.partition("=")
        if not sep:
            raise InjectorError(f"--match wants FIELD=VALUE, got {m!r}")
        pairs.append((key, value))
    return Filter(args.reason, args.older_than, args.newer_than, tuple(pairs), tuple(args.ids))


def run(args: argparse.Namespace, settings: config.Settings) -> int:
    queues = dead_letter_queues(settings, getattr(args, "queue", None))
    if args.action == "show":
        return _show(settings, queues, args.id)
    where = _filter(args)
    if args.action == "list":
        records = [r for q in queues for r in dlq_for(settings, q).peek(q, where)]
        _print_list(records, args.json)
        return 0
    if args.action == "export":
        return _export(settings, queues, where, args.file)
    if args.action == "purge":
        return _purge(settings, queues, where, args.yes)
    return _replay(settings, queues, where, args)


Dlq = RabbitDlq | ActiveMqDlq


def _show(settings: config.Settings, queues: Sequence[str], ident: str) -> int:
    for q in queues:
        for r in dlq_for(settings, q).peek(q, Filter(ids=(ident,))):
            print(json.dumps(json.loads(export_line(r)), indent=2))
            return 0
    raise InjectorError(f"no dead letter with id {ident!r} in {', '.join(queues)}")


def _print_list(records: list[Record], as_json: bool) -> None:
    counts = Counter(r.reason for r in records)
    if as_json:
        print(json.dumps({"count": len(records), "by_reason": dict(counts),
                          "messages": [r.summary() for r in records]}, indent=2))
        return
    out = Console()
    table = Table(title=f"{len(records)} dead letter(s)")
    for col in ("id", "queue", "reason", "failed at", "routing key", "replays", "error"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(r.id, r.queue, r.reason, r.failed_at.strftime("%Y-%m-%d %H:%M:%S") if r.failed_at else "?",
                      r.routing_key, str(r.replay_count), r.error[:120])
    out.print(table)
    for reason, n in counts.most_common():
        out.print(f"  {n:6d}  {reason}")


def _export(settings: config.Settings, queues: Sequence[str], where: Filter, path: str) -> int:
    fh = sys.stdout if path == "-" else open(path, "w")  # noqa: SIM115 - closed below unless stdout
    n = 0
    try:
        for q in queues:
            for r in dlq_for(settings, q).peek(q, where):
                fh.write(export_line(r) + "\n")
                n += 1
    finally:
        if fh is not sys.stdout:
            fh.close()
    err.print(f"exported {n} dead letter(s) to {path}")
    return 0


def _purge(settings: config.Settings, queues: Sequence[str], where: Filter, yes: bool) -> int:
    if not yes:
        n = sum(len(dlq_for(settings, q).peek(q, where)) for q in queues)
        err.print(f"{n} dead letter(s) would be deleted; add --yes to delete them")
        return 1
    for q in queues:
        err.print(f"purged {dlq_for(settings, q).purge(q, where)} dead letter(s) from {q}")
    return 0


def _replay(settings: config.Settings, queues: Sequence[str], where: Filter, args: argparse.Namespace) -> int:
    failed = 0
    for q in queues:
        dlq: Dlq = dlq_for(settings, q)
        total = min(dlq.depth(q), args.limit or 10**12)
        columns = (TextColumn(f"replay {q}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, disable=args.dry_run or total < 50) as bar:
            task = bar.add_task("replay", total=total)

            def advance(_r: Record, bar: Progress = bar, task: TaskID = task) -> None:
                bar.advance(task)

            s = dlq.replay(q, where, limit=args.limit, rate=args.rate, routing_key=args.routing_key,
                           dry_run=args.dry_run, progress=advance)
        verb = "would replay" if args.dry_run else "replayed"
        done = s.selected if args.dry_run else s.replayed
        err.print(f"{q}: looked at {s.seen}, selected {s.selected}, {verb} {done}, failed {s.failed}; "
                  f"by reason: {dict(s.reasons)}")
        for e in s.errors[:20]:
            err.print(f"  error: {e}")
        failed += s.failed
    return 1 if failed else 0
