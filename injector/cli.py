"""`rucio-injector` command line: parse → build settings → call the library. Nothing else.

Errors are answered in `main()`: one line on stderr and an exit code from `injector.exits` (see --help)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from injector import __version__, config, exits, logs, prerequisites
from injector.errors import InjectorError

log = logging.getLogger("rucio_injector")

Handler = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace) -> config.Settings:
    if getattr(args, "settings", None) is None:
        args.settings = config.load(args.config)
    return args.settings  # type: ignore[no-any-return]


STOPPABLE = ("watch", "ingest", "cleanup", "reconcile")  # verbs that run until stopped, or may run long
CHECKS_ITSELF = ("demo", "watch", "publish")  # publish: once its events are in the outbox


def _stop_on_signals() -> threading.Event:
    """SIGTERM / SIGINT set the event: the running verb finishes its batch, then exits."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the batch in progress, handing the rest back, then stopping",
                 signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def version_text() -> str:
    """This version and the libraries that speak to Rucio and the brokers (what a bug report needs)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{d} {of(d)}" for d in ("rucio-clients", "kombu", "amqp", "stomp.py", "pydantic"))
    return f"rucio-injector {__version__} ({libraries}; Python {sys.version.split()[0]})"


def cmd_publish(args: argparse.Namespace) -> int:
    """Write the events to the outbox, then send every event waiting there (one attempt; `--flush`: no new events).
    Exit 0 when the outbox is empty; else the broker's exit code with one line saying how many wait."""
    from injector.errors import PublishFailed
    from producers.drainer import LOCK_WAIT
    from producers.publish import DaqPublisher, file_closed

    settings = _settings(args)
    if not args.paths and not args.flush:
        raise InjectorError("give the files to announce, or --flush")
    if args.paths and not (args.site and args.instrument):
        raise InjectorError("--site and --instrument are required with files to announce")
    meta = dict(_key_value(kv) for kv in args.meta)
    extra = {k: v for k, v in (("run", args.run), ("night", args.night), ("datatype", args.datatype)) if v}
    events = [file_closed(p, site=args.site, instrument=args.instrument, metadata=meta, **extra) for p in args.paths]
    with DaqPublisher.of(settings, background=False, close_timeout=0) as daq:
        events = daq.publish(events)  # durable from here on, whatever the broker does
        try:
            prerequisites.check("publish", settings)
            drained = daq.flush(0, lock_wait=LOCK_WAIT)
            if drained.left:
                why = "another process is draining it" if drained.busy else "; ".join(sorted(set(
                    drained.parked.values()))[:3]) or "not confirmed"
                raise PublishFailed(f"the broker did not take every event ({why})")
        except Exception as exc:
            exc.add_note(f"{daq.depth()} event(s) wait in the outbox {daq.outbox.path}: "
                         "`rucio-injector publish --flush` sends them")
            raise
    for e in events:
        print(f"published {e.event_id} {e.routing_key} {e.path} size={e.size} adler32={e.adler32}")
    if args.flush:
        print(f"outbox empty: {drained.sent} event(s) sent")
    return 0


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InjectorError(f"--meta wants KEY=VALUE, got {text!r}")
    return key, value


def cmd_watch(args: argparse.Namespace) -> int:
    from producers import watch

    options = watch.Options(streams=args.stream, existing=args.existing, settle=args.settle, ignore=args.ignore,
                            hash_workers=args.hash_workers, metrics_port=args.metrics_port or 0)
    return watch.run(_settings(args), options, args.stop)


def cmd_ingest(args: argparse.Namespace) -> int:
    from consumers.services import run_ingest

    run_ingest(_settings(args), args.stop, args.metrics_port)
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from consumers.services import run_cleanup

    run_cleanup(_settings(args), args.stop, args.metrics_port)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from operations import findings, reconcile

    settings = _settings(args)
    options = reconcile.Options(dry_run=args.dry_run, fix=args.fix, grace=timedelta(seconds=args.grace),
                                window=timedelta(seconds=args.window), full=args.full)

    def report(found: list[findings.Finding]) -> None:
        if args.json:
            findings.print_json(found)
        else:
            findings.print_text(found, args.dry_run)

    last = reconcile.run(settings, options, args.stream, args.every, report, args.stop, args.metrics_port)
    return 1 if args.every is None and findings.needs_a_person(last) else 0


def cmd_status(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from injector.gateway import ClientGateway
    from operations import status

    settings = _settings(args)
    data = status.collect(settings, ClientGateway(settings.rucio), args.stream, args.night, args.since, args.full,
                          timedelta(seconds=args.window))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        status.render(data)
    missing = [name for name, q in data["queues"].items() if isinstance(q, str)]
    if missing:  # the tables show Rucio's side all the same
        from injector import topology

        where = topology.where(settings.broker.urls[0])
        raise topology.TopologyMissing(f"{len(missing)} queue(s) do not exist on {where} ({', '.join(missing)}): "
                                       "run `rucio-injector broker setup`")
    return 0


def _since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _scope_options(parser: argparse.ArgumentParser) -> None:
    """What a sweep reads: the open work (datasets not finished, files registered within the window), or all."""
    parser.add_argument("--window", type=float, default=86400, metavar="SECONDS",
                        help="files registered this recently are read whatever their dataset (default 86400); a "
                             "reconciler stopped longer than this should run once with --full")
    parser.add_argument("--full", action="store_true",
                        help="read every file of the stream, also those of finished datasets (an audit: its cost "
                             "grows with the stream's history)")


def cmd_broker(args: argparse.Namespace) -> int:
    from injector import topology

    settings = _settings(args)
    if settings.broker.transport == "stomp":
        return _activemq_setup(settings, args.action)
    declared = topology.declare(settings)
    if args.action == "definitions":
        print(json.dumps(topology.definitions(declared, settings), indent=2))
        return 0
    from injector.transport.amqp import connection

    conn = connection(settings.broker)
    try:
        for line in topology.apply(conn, declared):
            print(f"ok  {line}")
    finally:
        conn.release()
    return 0


def _activemq_setup(settings: config.Settings, action: str) -> int:
    """An ActiveMQ-only site: ActiveMQ makes a queue when it is first used and keeps what is sent to it, so there is
    nothing to declare; say where each kind of message goes (the topology's routes) and check the broker answers."""
    from injector import topology
    from injector.transport.stomp import open_connection

    q = settings.ingest.queue
    roles = {q: "ingest consumers, competing", topology.archived_queue(settings): "the DAQ's inbox"}
    lines = [f"{b.routing_key} → /queue/{b.queue} ({roles.get(b.queue, 'bound')})"
             for b in topology.declare(settings).bindings if b.exchange == settings.broker.daq_exchange]
    lines.append(f"dead letters of {q} → /queue/{topology.dead_letters_of(settings, q)}")
    if action == "definitions":
        print("ActiveMQ has no definitions to import: queues are made on first use\n" + "\n".join(lines))
        return 0
    conn, _, _ = open_connection(settings.broker.stomp, {}, heartbeats=False)
    conn.disconnect()
    print(f"ok  ActiveMQ {settings.broker.stomp.hosts} answers; it makes each queue when first used")
    for line in lines:
        print(f"ok  {line}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`config check`: 0 fine (warnings allowed), 1 a problem Rucio would refuse; an unreadable file exits 2 and
    Rucio not answering 4, through main(). `config show`: the effective settings (file, environment, defaults) as
    JSON, every password and URL credential masked."""
    settings = _settings(args)
    if args.action == "show":
        print(logs.masked(json.dumps(settings.model_dump(mode="json"), indent=2)))
        return 0
    print(f"ok      config: {len(settings.streams)} stream(s) valid")
    if not args.rucio:
        return 0
    from injector import preflight
    from injector.gateway import ClientGateway

    problems = preflight.check(settings, ClientGateway(settings.rucio))
    for p in problems:
        print(p.line())
    errors = sum(p.severity == "error" for p in problems)
    print(f"rucio: {errors} error(s), {len(problems) - errors} warning(s) in {len(settings.streams)} stream(s)")
    return 1 if errors else 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from operations.dlq import cli as dlq_cli

    return dlq_cli.run(args, _settings(args))


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from injector.testbed import demo
    except ModuleNotFoundError as exc:  # a core install: the demo's own dependencies are an extra
        if exc.name is None or exc.name.partition(".")[0] in ("injector", "consumers", "producers"):
            raise
        raise InjectorError(f"the demo needs {exc.name}, which is not installed: "
                            "pip install 'rucio-injector[demo]'") from exc

    opts = demo.Options(files=args.files, size=args.size, pace=args.pace, timeout=args.timeout, keep=args.keep,
                        broker=args.broker, database=args.database, stomp_port=args.stomp_port)
    return demo.run(opts)


DESCRIPTION = """\
Event-driven ingestion of detector data into Rucio. The DAQ side announces closed files (publish, watch); ingest
registers each in place at its stream's source RSE, in its dataset, with the archive rules; cleanup releases the
source once Rucio verified the archive copy and tells the DAQ; reconcile finishes what lost events left undone.
One config file (--config or $RUCIO_INJECTOR_CONFIG); Rucio's account from the rucio-clients config (RUCIO_CONFIG).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rucio-injector", description=DESCRIPTION, epilog=exits.epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_text())
    _global_options(p, None)
    sub = p.add_subparsers(dest="verb", required=True)

    pub = sub.add_parser("publish", help="publish file-closed events for files on disk (through the outbox)")
    pub.add_argument("paths", nargs="*", help="files to announce (size and adler32 are computed)")
    pub.add_argument("--flush", action="store_true",
                     help="send what waits in the outbox (files given are added first): exit 0 when it is empty")
    pub.add_argument("--site", help="required with files")
    pub.add_argument("--instrument", help="required with files")
    pub.add_argument("--run", type=int, help="run number")
    pub.add_argument("--night", help="observing night YYYYMMDD")
    pub.add_argument("--datatype", help="data type (a stream may match on it)")
    pub.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                     help="extra metadata carried by the event (repeatable)")
    pub.set_defaults(func=cmd_publish)

    wat = sub.add_parser("watch", help="watch the streams' buffer directories: file-closed for every file closed")
    wat.add_argument("--stream", action="append", default=[], metavar="NAME",
                     help="only this stream (repeatable; default: all)")
    wat.add_argument("--existing", action="store_true",
                     help="also announce the files already there (after the watcher was down; duplicates are "
                          "harmless)")
    wat.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                     help="announce a closed file once unmodified this long (writers that close and reopen)")
    wat.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                     help="never announce these names (repeatable; always ignored: .* *.tmp *.part)")
    wat.add_argument("--hash-workers", type=int, default=2, metavar="N",
                     help="files read for their checksum at once (small files do not wait behind a big one)")
    wat.add_argument("--metrics-port", type=int,
                     help="serve /metrics (refused files by reason, outbox depth) and /healthz here (0 = off)")
    wat.set_defaults(func=cmd_watch)

    ing = sub.add_parser("ingest", help="run the ingest consumer (file-closed → Rucio)")
    ing.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz here (0 = off)")
    ing.set_defaults(func=cmd_ingest)

    cln = sub.add_parser("cleanup", help="run the cleanup consumer (Rucio events → source release → file-archived)")
    cln.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz here (0 = off)")
    cln.set_defaults(func=cmd_cleanup)

    rec = sub.add_parser("reconcile", help="finish from Rucio's state what lost events left undone; explain the rest")
    rec.add_argument("--stream", action="append", default=[], help="only this stream (repeatable)")
    rec.add_argument("--every", type=float, metavar="SECONDS", help="sweep again every SECONDS until stopped")
    rec.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    rec.add_argument("--fix", action="store_true",
                     help="also apply the safe repairs: attach unattached files, add missing dataset rules, "
                          "boost STUCK rules, set again the epoch tombstone of a released source the reaper left "
                          "without a visible cause")
    rec.add_argument("--grace", type=float, default=3600,
                     help="seconds after its release before an undeleted source is diagnosed (default 3600)")
    _scope_options(rec)
    rec.add_argument("--json", action="store_true", help="one JSON list of findings per sweep")
    rec.add_argument("--metrics-port", type=int, help="with --every: serve /metrics and /healthz here (0 = off)")
    rec.set_defaults(func=cmd_reconcile)

    sta = sub.add_parser("status", help="files per stage per stream and dataset (from Rucio), queue depths")
    sta.add_argument("--stream", action="append", default=[], help="only this stream (repeatable)")
    sta.add_argument("--night", help="only datasets whose name contains this night (YYYYMMDD)")
    sta.add_argument("--since", type=_since, metavar="DATE",
                     help="only datasets created since DATE (YYYY-MM-DD, or an ISO time; UTC unless it says)")
    _scope_options(sta)
    sta.add_argument("--json", action="store_true", help="one JSON document, for scripts and monitoring")
    sta.set_defaults(func=cmd_status)

    brk = sub.add_parser("broker", help="broker topology")
    brk.add_argument("action", choices=["setup", "definitions"],
                     help="setup: declare exchanges/queues/bindings (idempotent); definitions: print them "
                          "as RabbitMQ definitions JSON")
    brk.set_defaults(func=cmd_broker)

    cfg = sub.add_parser("config", help="check the config file (and, with --rucio, every stream against Rucio), "
                                        "or show the effective settings")
    cfg.add_argument("action", choices=["check", "show"],
                     help="check: validate; show: print the effective settings (secrets masked) as JSON")
    cfg.add_argument("--rucio", action="store_true",
                     help="also check each stream against Rucio: RSEs, protocol, scope, rules, account rights")
    cfg.set_defaults(func=cmd_config)

    dem = sub.add_parser("demo", help="run the whole pipeline on a throw-away Rucio server (no config needed)")
    dem.add_argument("--files", type=int, default=25, help="files per instrument (MAGIC and LST1)")
    dem.add_argument("--size", type=int, default=1 << 20, help="mean file size in bytes")
    dem.add_argument("--pace", type=float, default=0.1, help="seconds between files the DAQ closes")
    dem.add_argument("--timeout", type=float, default=300, help="give up after this many seconds")
    dem.add_argument("--broker", default="auto", metavar="auto|embedded|URL",
                     help="auto (default): the local RabbitMQ when AMQP 5672 and STOMP answer, else the embedded "
                          "broker; embedded: always it; URL: that RabbitMQ's AMQP URL")
    dem.add_argument("--stomp-port", type=int, default=61613, help="the broker's STOMP port, for hermes")
    dem.add_argument("--database", choices=("auto", "postgresql", "sqlite"), default="auto",
                     help="the Rucio server's database (auto: PostgreSQL on 127.0.0.1:5432 when it answers)")
    dem.add_argument("--keep", action="store_true", help="keep server and files after the summary until Ctrl-C")
    dem.set_defaults(func=cmd_demo)

    from operations.dlq import cli as dlq_cli

    dlq_cli.add_parser(sub)
    sub.choices["dlq"].set_defaults(func=cmd_dlq)
    for verb in _subparsers(p):  # `rucio-injector ingest --config x` as well as `rucio-injector --config x ingest`
        _global_options(verb, argparse.SUPPRESS)
    return p


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """--config, --log-level, --log-json: on the program with their defaults, on every verb without (given after
    the verb they win; not given there, the program's value stays)."""
    unset = default is argparse.SUPPRESS
    parser.add_argument("--config", default=default,
                        help=f"TOML config file (default: ${config.CONFIG_ENV})")
    parser.add_argument("--log-level", default=default if unset else "INFO", type=str.upper, choices=LOG_LEVELS,
                        metavar="LEVEL", help=f"{', '.join(LOG_LEVELS)} (default INFO; any case)")
    parser.add_argument("--log-json", action="store_true", default=default if unset else False,
                        help="log JSON lines")


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every verb's parser, and its actions' (dlq list, ...), depth first."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += [child, *_subparsers(child)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `rucio-injector dlq list | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits 2 here
    logs.setup(args.log_level, args.log_json)
    func: Handler = args.func
    if args.verb in STOPPABLE:  # from the first moment a signal can reach it, SIGTERM means "stop cleanly"
        args.stop = _stop_on_signals()
    try:
        if args.verb not in CHECKS_ITSELF and not (args.verb == "broker" and args.action == "definitions"):
            prerequisites.check(args.verb, _settings(args), action=getattr(args, "action", None),
                                looping=getattr(args, "every", None) is not None,
                                streams=getattr(args, "stream", None))
        return func(args)
    except BaseException as exc:  # noqa: BLE001 - every failure gets its one line and exit code, or re-raised
        if isinstance(exc, (SystemExit, BrokenPipeError)):  # a closed stdout is not the broker's failure
            raise
        failure = exits.explain(exc, getattr(args, "settings", None))
        if failure is None:
            raise
        code, line = failure
        if args.log_json:  # a log shipper parses every stderr line: the failure too, with the same keys
            logging.getLogger("injector.cli").error("rucio-injector %s: %s", args.verb, line,
                                                    extra={"exit_code": code})
        else:
            print(f"rucio-injector {args.verb}: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
