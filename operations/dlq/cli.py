"""`rucio-injector dlq …`: the operator's view of dead letters (tables for people, JSON for scripts).

Whatever comes from a message or the config (errors, reasons, ids, paths, queue names) is shown as plain
text, never read as rich markup: an error text holding `[/bold]` is printed as it is. Tables show ids by
their first 8 characters; `show` and `--id` take any unambiguous prefix; `--json` gives full ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from injector import config, prerequisites, topology
from injector.deadletter import SHORT_ID, Filter, Record, UnknownId, parse_duration, resolve
from injector.errors import InjectorError
from operations.dlq import ActiveMqDlq, dead_letter_queues, dlq_for, export_line
from operations.dlq.replay import ReplaySummary

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
        a.add_argument("--id", action="append", default=[], dest="ids",
                       help=f"only this id, or an unambiguous prefix of it (tables show {SHORT_ID}); repeatable")
        return a

    with_filters(acts.add_parser("list", help="peek (nothing is consumed), with counts per reason")).add_argument(
        "--json", action="store_true", help="full ids and every field, for scripts")
    show = acts.add_parser("show", help="one dead letter in full")
    show.add_argument("id", help="its id, or an unambiguous prefix")
    show.add_argument("--queue", help="work queue or its DLQ to look in (default: every DLQ)")
    exp = with_filters(acts.add_parser("export", help="write dead letters as JSON lines (nothing is consumed)"),
                       queue=False)
    exp.add_argument("file", help="output file, - for stdout")
    exp.add_argument("--queue", help="work queue or its DLQ (default: every DLQ)")
    purge = with_filters(acts.add_parser("purge", help="delete dead letters for good"))
    purge.add_argument("--yes", action="store_true", help="really delete")
    rep = with_filters(acts.add_parser(
        "replay", help="send dead letters back into the queue they came from (only those present at the start)"))
    rep.add_argument("--limit", type=int, metavar="N", help="replay at most N dead letters (in queue order)")
    rep.add_argument("--rate", type=float, metavar="R", help="at most R messages per second")
    rep.add_argument("--dry-run", action="store_true", help="say what would be replayed; change nothing")
    rep.add_argument("--to", dest="routing_key", metavar="ROUTING_KEY",
                     help="instead: through the original exchange with this routing key (ActiveMQ: to this "
                          "destination)")
    mig = acts.add_parser("migrate", help="recreate a DLQ an older version declared as a quorum queue as the "
                                          "classic queue declared now, keeping every dead letter")
    mig.add_argument("queue", nargs="?", help="work queue or its DLQ (default: every RabbitMQ DLQ)")


def run(args: argparse.Namespace, settings: config.Settings) -> int:
    queues = dead_letter_queues(settings, getattr(args, "queue", None))
    for server in {d.server for d in (dlq_for(settings, q) for q in queues) if isinstance(d, ActiveMqDlq)}:
        prerequisites.stomp_reachable(server)
    if args.action == "show":
        return _show(settings, queues, args.id)
    if args.action == "migrate":
        return _migrate(settings, [q for q in queues if not isinstance(dlq_for(settings, q), ActiveMqDlq)])
    where = _filter(args, settings, queues)
    if args.action == "list":
        _print_list([r for q in queues for r in dlq_for(settings, q).peek(q, where)], args.json)
        return 0
    if args.action == "export":
        return _export(settings, queues, where, args.file)
    if args.action == "purge":
        return _purge(settings, queues, where, args.yes)
    return _replay(settings, queues, where, args)


def _migrate(settings: config.Settings, queues: Sequence[str]) -> int:
    from operations.dlq.migrate import migrate, missing

    absent = missing(settings, queues)
    if absent:
        raise topology.TopologyMissing(f"queue(s) {', '.join(absent)} do not exist on "
                                       f"{topology.where(settings.broker.urls[0])}: run `rucio-injector broker setup`")
    for q in queues:
        m = migrate(settings, q)
        err.print(Text(f"{q}: {m.note}" if m.note else
                       f"{q}: recreated as declared now; {m.moved_out} dead letter(s) moved out, {m.moved_back} "
                       f"back ({m.duplicates} duplicate(s) dropped)"))
    return 0


def _filter(args: argparse.Namespace, settings: config.Settings, queues: Sequence[str]) -> Filter:
    pairs = []
    for m in args.match:
        key, sep, value = m.partition("=")
        if not sep:
            raise InjectorError(f"--match wants FIELD=VALUE, got {m!r}")
        pairs.append((key, value))
    ids = tuple(args.ids)
    if ids:  # prefixes become full ids, or an error naming the candidates
        ids = resolve(ids, [r.id for q in queues for r in dlq_for(settings, q).peek(q)])
    return Filter(args.reason, args.older_than, args.newer_than, tuple(pairs), ids)


def _show(settings: config.Settings, queues: Sequence[str], ident: str) -> int:
    records = [r for q in queues for r in dlq_for(settings, q).peek(q)]
    try:
        (full,) = resolve((ident,), [r.id for r in records])
    except UnknownId as exc:
        raise UnknownId(f"{exc} in {', '.join(queues)}") from None
    for r in records:
        if r.id == full:
            print(json.dumps(json.loads(export_line(r)), indent=2, ensure_ascii=False))
            break
    return 0


def _print_list(records: list[Record], as_json: bool) -> None:
    counts = Counter(r.reason for r in records)
    if as_json:
        print(json.dumps({"count": len(records), "by_reason": dict(counts),
                          "messages": [r.summary() for r in records]}, indent=2, default=str))
        return
    out = Console()
    for queue in dict.fromkeys(r.queue for r in records):
        out.print(list_table(queue, [r for r in records if r.queue == queue]))
    out.print(Text(f"{len(records)} dead letter(s)"))
    for reason, n in counts.most_common():
        out.print(Text(f"  {n:6d}  {reason}"))


def list_table(queue: str, records: list[Record]) -> Table:
    """One row per dead letter, one line each even at 80 columns: short id, when, why, replays, the error."""
    table = Table(title=Text(f"{queue}: {len(records)} dead letter(s)"), title_justify="left", expand=True)
    table.add_column("id", no_wrap=True, min_width=SHORT_ID)
    table.add_column("failed (UTC)", no_wrap=True)
    table.add_column("reason", no_wrap=True, max_width=24, overflow="ellipsis")
    table.add_column("n", justify="right", no_wrap=True, header_style="bold")
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for r in records:
        when = r.failed_at.strftime("%m-%d %H:%M") if r.failed_at else "?"
        table.add_row(Text(r.short_id), Text(when), Text(r.reason), Text(str(r.replay_count)), Text(_line(r.error)))
    return table


def _line(text: str, most: int = 300) -> str:
    """One line of at most `most` characters (errors can be long and multi-line)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= most else flat[: most - 1] + "…"


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
    err.print(Text(f"exported {n} dead letter(s) to {path}"))
    return 0


def _purge(settings: config.Settings, queues: Sequence[str], where: Filter, yes: bool) -> int:
    if not yes:
        n = sum(len(dlq_for(settings, q).peek(q, where)) for q in queues)
        err.print(Text(f"{n} dead letter(s) would be deleted; add --yes to delete them"))
        return 1
    for q in queues:
        err.print(Text(f"purged {dlq_for(settings, q).purge(q, where)} dead letter(s) from {q}"))
    return 0


def _replay(settings: config.Settings, queues: Sequence[str], where: Filter, args: argparse.Namespace) -> int:
    summaries = []
    for q in queues:
        dlq = dlq_for(settings, q)
        total = min(dlq.depth(q), args.limit or 10**12)
        columns = (TextColumn(f"replay {escape(q)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, disable=args.dry_run or total < 50) as bar:
            task = bar.add_task("replay", total=total)

            def advance(_r: Record, bar: Progress = bar, task: TaskID = task) -> None:
                bar.advance(task)

            summaries.append(dlq.replay(q, where, limit=args.limit, rate=args.rate, routing_key=args.routing_key,
                                        dry_run=args.dry_run, progress=advance))
    for s in summaries:
        err.print(Text(f"{s.queue}: looked at {s.seen} of the {s.depth} present at the start"
                       + (" (dry run: nothing changed)" if s.dry_run else "")))
        err.print(summary_table(s))
        for note in notes(s):
            err.print(Text(note))
    return 0 if all(s.clean for s in summaries) else 1


def summary_table(s: ReplaySummary) -> Table:
    """One queue's replay: per reason and in total, selected, replayed (or would be) and failed."""
    table = Table()
    table.add_column("reason", overflow="fold")
    for name in ("selected", "would replay" if s.dry_run else "replayed", "failed"):
        table.add_column(name, justify="right", no_wrap=True)
    rows = sorted(s.by_reason.items())
    for i, (reason, c) in enumerate(rows):
        done = c["selected"] if s.dry_run else c["replayed"]
        table.add_row(Text(reason), str(c["selected"]), str(done), str(c["failed"] + c["doubtful"]),
                      end_section=i == len(rows) - 1)
    done = s.selected if s.dry_run else s.replayed
    table.add_row("total", str(s.selected), str(done), str(s.failed + s.doubtful), style="bold")
    return table


def notes(s: ReplaySummary) -> list[str]:
    """What else an operator must know about one replay, one line each."""
    out = [f"{s.queue}: {text}" for n, text in (
        (s.doubtful, f"{s.doubtful} sent when the connection was lost, unconfirmed: still dead-lettered, and maybe "
                     "also back in the queue (harmless: consumers are idempotent)"),
        (s.in_both, f"{s.in_both} replayed but still dead-lettered too (the broker kept them): run the replay again "
                    "or purge them by id"),
        (s.unchecked, f"{s.unchecked} replayed whose removal could not be checked: see `dlq list`"),
        (s.resettled, f"{s.resettled} removals the broker had lost were done again"),
    ) if n]
    if s.interrupted:
        out.append(f"{s.queue}: interrupted: {s.interrupted}; what was not reached is still dead-lettered: run "
                   "the same replay again (the broker returns what the lost connection held once it notices the "
                   "loss: at once when the connection closed, else after the heartbeat timeout)")
    out += [f"  error: {_line(e, 200)}" for e in s.errors[:20]]
    if len(s.errors) > 20:
        out.append(f"  … and {len(s.errors) - 20} more error(s) (the log has each)")
    return out
