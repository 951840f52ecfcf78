"""`rucio-injector demo`: the whole pipeline on a throw-away Rucio server, in one command.

What runs (all real, nothing mocked except the transfer tool, which really copies the bytes):
  * a Rucio server from PyPI (own venv; PostgreSQL when it answers on 127.0.0.1:5432, else SQLite)
    with a non-deterministic buffer RSE (ORM-BUFFER) and a deterministic archive (PIC-ARCHIVE);
  * the local RabbitMQ (AMQP for the DAQ and the consumers, its STOMP plugin for hermes), with a
    topology of its own (demo-<tag>.*) deleted at the end;
  * a simulated DAQ writing real files for MAGIC and LST1 and publishing file-closed events;
  * the ingest and cleanup consumers, and Rucio's daemons in a loop (judge, conveyor with the
    mock transfer tool, hermes, reaper);
  * a DAQ inbox receiving file-archived.

Stages per file: closed → registered → replicated → source released → archived. The live
display and the latency figures come from what each part reports (Rucio's replicas for
registered/replicated, the cleanup consumer's verified release, the DAQ's file-archived inbox),
and the final proof is read from disk and from Rucio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from injector import topology
from injector.checksum import size_and_adler32
from injector.config import BROKER_URL_ENV, Settings, parse
from injector.errors import InjectorError
from injector.events import FileClosed
from injector.logs import masked
from injector.testbed.broker import embedded  # pamqp: the [demo] extra
from injector.testbed.rses import create_rses
from injector.testbed.rucio import HermesBroker, ensure_server_venv, start_server

log = logging.getLogger(__name__)

SOURCE, ARCHIVE = "ORM-BUFFER", "PIC-ARCHIVE"
STAGES = ("closed", "registered", "replicated", "released", "archived")
INSTRUMENTS = (("MAGIC", "magic", "MAGIC_{night}_raw"), ("LST1", "lst", "LST1_{night}_raw"))
DAEMON_PASS = ("judge-evaluator", "submitter", "poller", "finisher", "hermes", "reaper", "hermes")
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
AUTO, EMBEDDED = "auto", "embedded"  # --broker: the local RabbitMQ when it answers, else embedded; always embedded


class DemoError(InjectorError):
    """The demo could not run; the message says what is missing."""


@dataclass(frozen=True)
class Options:
    files: int = 25  # per instrument
    size: int = 1 << 20
    pace: float = 0.1  # seconds between files the DAQ closes
    broker: str = AUTO  # AUTO, EMBEDDED or a RabbitMQ AMQP URL
    stomp_port: int = 61613
    timeout: float = 300.0
    keep: bool = False  # keep the server and files after the summary until Ctrl-C
    database: str = "auto"  # the Rucio server's: auto (PostgreSQL when it answers, else SQLite), postgresql, sqlite
    live: bool = True


@dataclass
class Track:
    """Stage timestamps (monotonic) of one file, keyed by scope:name."""

    instrument: str
    size: int
    adler32: str
    at: dict[str, float] = field(default_factory=dict)


class Tracker:
    def __init__(self) -> None:
        self.files: dict[str, Track] = {}
        self.dead: dict[str, str] = {}  # scope:name → why a consumer dead-lettered its event
        self.lock = threading.Lock()

    def dead_lettered(self, did: str, why: str) -> None:
        with self.lock:
            self.dead.setdefault(did, why)

    def dead_count(self, instrument: str | None = None) -> int:
        with self.lock:
            return sum(1 for d in self.dead if instrument is None
                       or (d in self.files and self.files[d].instrument == instrument))

    def closed(self, did: str, event: FileClosed) -> None:
        with self.lock:
            self.files[did] = Track(event.instrument, event.size, event.adler32, {"closed": time.monotonic()})

    def mark(self, did: str, stage: str) -> None:
        with self.lock:
            track = self.files.get(did)
            if track is not None and stage not in track.at:
                track.at[stage] = time.monotonic()

    def pending(self, stage: str) -> list[str]:
        with self.lock:
            return [d for d, t in self.files.items() if stage not in t.at]

    def count(self, instrument: str, stage: str) -> int:
        with self.lock:
            return sum(1 for t in self.files.values() if t.instrument == instrument and stage in t.at)

    def latencies(self, stage: str) -> list[float]:
        with self.lock:
            return sorted(t.at[stage] - t.at["closed"] for t in self.files.values() if stage in t.at)


class _OutcomeLog(logging.Handler):
    """Listens to what the consumers report per event (injector.settle logs outcome + did)."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(logging.INFO)
        self.tracker = tracker

    def emit(self, record: logging.LogRecord) -> None:
        did = getattr(record, "did", None)
        if getattr(record, "outcome", None) == "released" and did:
            self.tracker.mark(did, "released")
        elif getattr(record, "kind", None) == "dead-letter" and did:
            self.tracker.dead_lettered(did, record.getMessage())


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything the demo started, remove it, exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The demo's one place for signals: SIGINT (Ctrl-C), SIGTERM (kill, systemd) and SIGHUP (a closed terminal)
    all mean "stop and clean up". The first one raises Interrupted in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so every `with` and `finally` of the demo unwinds. Later ones, and any arriving once the
    clean-up has begun (`hold`), are only noted: nothing may cut the clean-up short."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._held = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers only there
            self._saved = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def hold(self) -> None:
        self._held = True

    def _handle(self, signum: int, _frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if first and not self._held:
            raise Interrupted(signum)


def run(options: Options, console: Console | None = None) -> int:
    """Run the demo; 0 when every file was archived and proven. SIGINT, SIGTERM and SIGHUP, in any phase, stop
    and remove everything it started (processes, database, temp dir, topology); it then returns 128 + signum."""
    console = console or Console()
    with StopSignals() as signals:
        code = _run_then_clean_up(options, console, signals)
    return code if signals.received is None else 128 + signals.received


def _run_then_clean_up(options: Options, console: Console, signals: StopSignals) -> int:
    cleanup = contextlib.ExitStack()  # everything started is registered here as it starts
    try:
        try:
            return _run(options, console, cleanup)
        finally:
            signals.hold()
    except Interrupted as exc:
        _say(console, f"[yellow]interrupted by {exc}: stopping everything[/]")
        return 128 + exc.signum
    except OSError:
        if signals.received is None:
            raise
        return 128 + signals.received  # the terminal went away (SIGHUP): nothing left to print to
    finally:
        cleanup.close()


def _run(options: Options, console: Console, cleanup: contextlib.ExitStack) -> int:
    with console.status("Rucio server venv (first run installs rucio from PyPI, ~2 min)"):
        venv_python = ensure_server_venv()
    tag = uuid.uuid4().hex[:6]
    tmp = Path(tempfile.mkdtemp(prefix=f"rucio-injector-demo-{tag}-"))
    log_file = tmp / "demo.log"
    cleanup.callback(_remove, tmp, log_file if options.keep else None, console)
    console.print(f"logs of every component: {log_file}")
    cleanup.enter_context(_logs_to(log_file))
    broker = cleanup.enter_context(_broker(options, log_file, console))
    server = cleanup.enter_context(_server(console, tmp, venv_python, options.database))
    os.environ["RUCIO_CONFIG"] = str(server.client_config)
    client = _rucio_client()
    buffer, archive = _rses(client, tmp / "data")
    config = _config(broker, tag, buffer)
    settings = parse(config, source="<demo>")
    config_file = tmp / "injector.toml"  # what it runs with, for `status`, `reconcile` and `dlq`
    config_file.write_text(toml_text(config))
    db = f"{'SQLite' if server.database.startswith('/') else 'PostgreSQL'} {server.database}"
    console.print(f"Rucio {server.url} ({db}), buffer {buffer}, archive {archive}")
    console.print(f"broker: {broker.what}, AMQP {masked(broker.amqp_url)} (demo topology demo-{tag}.*), "
                  f"hermes → STOMP {broker.stomp_host}:{broker.stomp_port} /topic/{settings.cleanup.topic}")
    amqp = urlparse(broker.amqp_url)
    hermes = HermesBroker(host=broker.stomp_host, port=broker.stomp_port,
                          destination=settings.cleanup.hermes_destination,
                          username=amqp.username or "guest", password=amqp.password or "guest")
    cleanup.enter_context(_topology(settings))
    tracker = Tracker()
    ok = _pipeline(options, settings, server, hermes, client, tracker, buffer, console)
    _summary(tracker, options, console)
    proof = _proof(tracker, client, buffer, console)
    _look_yourself(server, client, tracker, console, config_file)
    if options.keep:
        console.print(f"[bold]--keep[/]: server and files stay until Ctrl-C, SIGTERM or SIGHUP (then all goes "
                      f"but the log, {log_file}, which moves to {_kept_log(tmp)})")
        while True:
            time.sleep(3600)
    return 0 if ok and proof else 1


def _kept_log(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".log")


def _remove(tmp: Path, keep_log: Path | None, console: Console) -> None:
    """Remove the demo's temp dir; with --keep its log moves out first, and the demo says where."""
    if keep_log is not None and keep_log.exists():
        shutil.move(keep_log, _kept_log(tmp))
        _say(console, f"log kept: {_kept_log(tmp)}")
    shutil.rmtree(tmp, ignore_errors=True)


def _say(console: Console, text: str) -> None:
    """Print while stopping: after a SIGHUP the terminal may be gone, which must not stop the clean-up."""
    with contextlib.suppress(OSError):
        console.print(text)


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """The consumers log every event; during the demo that goes to a file, the screen shows progress."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s"))
    root.handlers = [handler]
    root.setLevel(min(root.level, logging.INFO) or logging.INFO)
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


@dataclass(frozen=True)
class DemoBroker:
    amqp_url: str
    stomp_host: str
    stomp_port: int
    what: str


def auto_url(env: Mapping[str, str]) -> str:
    """--broker auto tries this RabbitMQ: the first of $RUCIO_INJECTOR_BROKER_URL (as every verb reads it), else the
    local one with its default user."""
    return env.get(BROKER_URL_ENV, "").split(",")[0].strip() or DEFAULT_AMQP


@contextlib.contextmanager
def _broker(options: Options, log_file: Path, console: Console) -> Iterator[DemoBroker]:
    """The local RabbitMQ (AMQP + its STOMP plugin) when it answers, else the embedded broker."""
    if options.broker != EMBEDDED:
        url = auto_url(os.environ) if options.broker == AUTO else options.broker
        host = urlparse(url).hostname or "127.0.0.1"
        missing = (_unreachable(host, urlparse(url).port or 5672, "RabbitMQ (AMQP)")
                   or _unreachable(host, options.stomp_port, "RabbitMQ's STOMP plugin (for hermes; "
                                   "enable it: rabbitmq-plugins enable rabbitmq_stomp)"))
        if missing is None:
            yield DemoBroker(url, host, options.stomp_port, "RabbitMQ")
            return
        if options.broker != AUTO:
            raise DemoError(missing)
        console.print(f"[yellow]{escape(missing)}[/]\n[yellow]→ using the embedded broker instead[/] (one Python "
                      "process speaking AMQP 0-9-1 and STOMP, messages in memory; for this demo only)")
    with embedded(log_file=log_file) as eb:
        yield DemoBroker(eb.amqp_url, eb.host, eb.stomp_port, "embedded (in memory)")


@contextlib.contextmanager
def _server(console: Console, tmp: Path, venv_python: Path, database: str) -> Iterator[Any]:
    with console.status("starting a throw-away Rucio server"):
        server = start_server(tmp / "rucio", venv_python=venv_python, database=database)
    with server:
        yield server


def _unreachable(host: str, port: int, what: str) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"{what} is not reachable on {host}:{port} ({exc})"


def _rucio_client() -> Any:
    from rucio.client import Client

    return Client()


def _rses(client: Any, root: Path) -> tuple[Path, Path]:
    buffer, archive = create_rses(client, root, source=SOURCE, archive=ARCHIVE)
    for _, scope, _ in INSTRUMENTS:
        client.add_scope("root", scope)
    return buffer, archive


def _config(broker: DemoBroker, tag: str, buffer: Path) -> dict[str, Any]:
    return {
        "broker": {"urls": [broker.amqp_url], "daq_exchange": f"demo-{tag}.daq",
                   "dead_letter_exchange": f"demo-{tag}.dlx"},
        "ingest": {"queue": f"demo-{tag}.ingest", "batch_window": 0.2},
        "cleanup": {"flavour": "rabbitmq", "stomp_hosts": [f"{broker.stomp_host}:{broker.stomp_port}"],
                    "hermes_destination": f"/topic/demo-{tag}.rucio.events", "queue": f"demo-{tag}.cleanup",
                    "batch_window": 0.2},
        "metrics": {"ingest_port": 0, "cleanup_port": 0, "reconcile_port": 0},
        "streams": [
            {"name": f"{inst.lower()}-raw", "site": "ORM", "instrument": inst, "source_rse": SOURCE,
             "storage_root": str(buffer / inst), "pfn_prefix": "file://localhost", "scope": scope,
             "did_name": "relative", "did_prefix": f"{inst.lower()}/raw/", "dataset": dataset,
             "rules": [{"rse_expression": ARCHIVE, "copies": 1, "activity": "Demo"}]}
            for inst, scope, dataset in INSTRUMENTS],
    }


def toml_text(data: dict[str, Any]) -> str:
    """The demo's configuration as a TOML file (tables of scalars and lists, `[[streams]]` with inline rules):
    the file `status`, `reconcile` and `dlq` can be pointed at."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            # a TOML basic string: JSON's escapes are TOML's (non-ASCII kept as is: TOML has no surrogate pairs)
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"no TOML for {v!r}")

    out = []
    for section, table in data.items():
        rows = table if isinstance(table, list) else [table]
        for row in rows:
            out.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            out += [f"{k} = {value(v)}" for k, v in row.items()]
            out.append("")
    return "\n".join(out)


@contextlib.contextmanager
def _topology(settings: Settings) -> Iterator[None]:
    """The demo's own exchanges and queues, removed at the end over a new connection: the first one may have
    been closed by the broker for missed heartbeats while --keep waited."""
    decl = topology.declare(settings)
    try:
        _on_broker(settings, lambda conn: topology.apply(conn, decl))
        yield
    finally:
        try:
            _on_broker(settings, lambda conn: topology.remove(conn, decl))
        except Exception:  # the broker went away: nothing more the demo can do
            log.exception("could not delete the demo's topology demo-*")


def _on_broker(settings: Settings, action: Callable[[Any], object]) -> None:
    from injector.transport.amqp import connection

    conn = connection(settings.broker)
    try:
        action(conn)
    finally:
        conn.release()


def _pipeline(options: Options, settings: Settings, server: Any, hermes: Any, client: Any, tracker: Tracker,
              buffer: Path, console: Console) -> bool:
    from consumers.services import cleanup_worker, ingest_worker

    stop = threading.Event()
    handler = _OutcomeLog(tracker)
    logging.getLogger("injector.settle").addHandler(handler)
    ingest, cleanup = ingest_worker(settings), cleanup_worker(settings)
    errors: list[str] = []
    threads = [
        _thread("ingest", ingest.run, stop, errors),
        _thread("cleanup", cleanup.run, stop, errors),
        _thread("daq", lambda s: _daq(options, settings, buffer, tracker, s), stop, errors),
        _thread("inbox", lambda s: _inbox(settings, tracker, s), stop, errors),
        _thread("rucio-daemons", lambda s: _daemons(server, hermes, s), stop, errors),
        _thread("watch-rucio", lambda s: _watch_rucio(client, tracker, s), stop, errors),
    ]
    total = options.files * len(INSTRUMENTS)
    deadline = time.monotonic() + options.timeout
    try:
        with Live(_display(tracker, options), console=console, refresh_per_second=4,
                  transient=False, auto_refresh=options.live) as live:
            while time.monotonic() < deadline and not errors:
                if len(tracker.latencies("archived")) + tracker.dead_count() >= total:
                    break
                time.sleep(0.25)
                live.update(_display(tracker, options))
            live.update(_display(tracker, options))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        logging.getLogger("injector.settle").removeHandler(handler)
        _say(console, "")  # the live display ends without a newline, also when interrupted
    for e in errors:
        console.print(f"[red]{escape(e)}[/]")
    with tracker.lock:
        dead = sorted(tracker.dead.values())
    if dead:
        console.print(f"[red]{len(dead)} event(s) dead-lettered[/] (the log has every one), e.g.:")
        for why in dead[:3]:
            console.print(f"  [red]{escape(why)}[/]")
    done = len(tracker.latencies("archived"))
    if done + len(dead) < total and not errors:
        console.print(f"[red]timed out after {options.timeout:.0f}s: {done}/{total} files archived[/]")
    return done == total and not errors


def _thread(name: str, target: Callable[[threading.Event], None], stop: threading.Event,
            errors: list[str]) -> threading.Thread:
    def body() -> None:
        try:
            target(stop)
        except Exception as exc:  # surfaced in the summary and the exit code
            log.exception("%s failed", name)
            errors.append(f"{name} failed: {type(exc).__name__}: {exc}")

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


def _daq(options: Options, settings: Settings, buffer: Path, tracker: Tracker, stop: threading.Event) -> None:
    """A DAQ closing files for two instruments, announcing each one as it closes."""
    from injector.streams import did_name
    from producers.publish import DaqPublisher, file_closed

    night = time.strftime("%Y%m%d", time.gmtime())
    streams = {s.instrument: s for s in settings.streams}
    rng = random.Random(20261125)
    with DaqPublisher(settings.broker) as daq:
        for i in range(options.files):
            for inst, scope, _ in INSTRUMENTS:
                if stop.is_set():
                    return
                path = buffer / inst / night / f"{inst}.Run{1000 + i:05d}.{i:04d}.fits.fz"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(rng.randbytes(max(1, options.size + rng.randint(-options.size // 4,
                                                                                 options.size // 4))))
                event = file_closed(path, site="ORM", instrument=inst, night=night, run=1000 + i)
                tracker.closed(f"{scope}:{did_name(streams[inst], str(path))}", event)
                daq.publish([event])
            stop.wait(options.pace)


def _inbox(settings: Settings, tracker: Tracker, stop: threading.Event) -> None:
    """The DAQ's side: file-archived arrives on its inbox queue."""
    from injector.events import decode_file_archived
    from injector.transport.amqp import connection

    conn = connection(settings.broker)
    try:
        channel = conn.channel()
        while not stop.is_set():
            msg = channel.basic_get(topology.archived_queue(settings), no_ack=False)
            if msg is None:
                stop.wait(0.2)
                continue
            ev = decode_file_archived(msg.body)
            tracker.mark(f"{ev.scope}:{ev.name}", "archived")
            channel.basic_ack(msg.delivery_tag)
    finally:
        conn.release()


def _daemons(server: Any, hermes: Any, stop: threading.Event) -> None:
    """Rucio's daemons, one pass each, in a loop (as a site runs them continuously)."""
    while not stop.is_set():
        server.run_daemons(*DAEMON_PASS, rses=[SOURCE, ARCHIVE], hermes=hermes, stop=stop)
        stop.wait(0.5)


def _watch_rucio(client: Any, tracker: Tracker, stop: threading.Event) -> None:
    """registered = Rucio holds the source replica; replicated = the archive copy is AVAILABLE."""
    while not stop.wait(0.5):
        todo = [d for d in tracker.pending("replicated")]
        for i in range(0, len(todo), 500):
            dids = [dict(zip(("scope", "name"), d.split(":", 1), strict=True)) for d in todo[i:i + 500]]
            for rep in client.list_replicas(dids, all_states=True):
                did = f"{rep['scope']}:{rep['name']}"
                states = rep.get("states", {})
                if SOURCE in states or ARCHIVE in states:
                    tracker.mark(did, "registered")
                if states.get(ARCHIVE) == "AVAILABLE":
                    tracker.mark(did, "replicated")


def _display(tracker: Tracker, options: Options) -> Group:
    total = options.files
    table = Table(title="rucio-injector demo: files per stage", expand=False)
    table.add_column("instrument")
    for s in STAGES:
        table.add_column(s, justify="right")
    dead = tracker.dead_count() > 0
    if dead:
        table.add_column("dead-lettered", justify="right", style="red")
    for inst, _, _ in INSTRUMENTS:
        cells = [f"{tracker.count(inst, s)}/{total}" for s in STAGES]
        table.add_row(inst, *cells, *([str(tracker.dead_count(inst))] if dead else []))
    bars = Progress(TextColumn("{task.description:>10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    for s in STAGES:
        bars.add_task(s, total=total * len(INSTRUMENTS), completed=len(tracker.latencies(s)) if s != "closed"
                      else sum(tracker.count(i, "closed") for i, _, _ in INSTRUMENTS))
    return Group(table, bars)


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _summary(tracker: Tracker, options: Options, console: Console) -> None:
    with tracker.lock:
        n, nbytes = len(tracker.files), sum(t.size for t in tracker.files.values())
    table = Table(title=f"{n} files, {nbytes / 1e6:.1f} MB: latency from file closed")
    table.add_column("stage")
    table.add_column("files", justify="right")
    table.add_column("p50", justify="right")
    table.add_column("p99", justify="right")
    for s in STAGES[1:]:
        lat = tracker.latencies(s)
        p50 = f"{statistics.median(lat):.1f}s" if lat else "-"
        p99 = f"{_percentile(lat, 0.99):.1f}s" if lat else "-"
        table.add_row(s, str(len(lat)), p50, p99)
    console.print(table)


def _proof(tracker: Tracker, client: Any, buffer: Path, console: Console) -> bool:
    """The buffer is empty; the archive holds every file with the adler32 the DAQ announced."""
    left = sorted(p for p in buffer.rglob("*") if p.is_file())
    with tracker.lock:
        files = dict(tracker.files)
    dids = [dict(zip(("scope", "name"), d.split(":", 1), strict=True)) for d in files]
    good, bad = 0, []
    pfns: dict[str, str] = {}
    for i in range(0, len(dids), 500):
        for rep in client.list_replicas(dids[i:i + 500], rse_expression=ARCHIVE):
            for pfn in rep.get("rses", {}).get(ARCHIVE, []):
                pfns[f"{rep['scope']}:{rep['name']}"] = pfn
    for did, track in files.items():
        pfn = pfns.get(did)
        path = Path(urlparse(pfn).path) if pfn else None
        if path is not None and path.is_file() and size_and_adler32(path) == (track.size, track.adler32):
            good += 1
        else:
            bad.append(f"{did}: {'no archive replica' if path is None else f'{path} missing or other adler32'}")
    ok = not left and not bad
    style = "green" if ok else "red"
    console.print(f"[{style}]proof: buffer holds {len(left)} file(s); archive holds {good}/{len(files)} files "
                  f"with the DAQ's adler32[/]")
    for line in [str(p) for p in left[:5]] + bad[:5]:
        console.print(f"[red]  {escape(line)}[/]")
    return ok


def _look_yourself(server: Any, client: Any, tracker: Tracker, console: Console, config_file: Path) -> None:
    with tracker.lock:
        did = next(iter(tracker.files), "lst:<name>")
    scope = did.split(":", 1)[0]
    datasets = sorted(client.list_dids(scope, {"name": "*"}, did_type="dataset")) if ":" in did else []
    dataset = f"{scope}:{datasets[0]}" if datasets else f"{scope}:<dataset>"
    console.print("Look for yourself (run with --keep to keep the server up after the summary):")
    console.print(f"  export RUCIO_CONFIG={server.client_config}\n"
                  f"  rucio replica list file --all-states {did}\n"
                  f"  rucio did list --filter type=dataset '{scope}:*'\n"
                  f"  rucio did content list {dataset}\n"
                  f"  rucio rule list --did {dataset}\n"
                  f"  export RUCIO_INJECTOR_CONFIG={config_file}   # the demo's own configuration\n"
                  f"  rucio-injector status\n"
                  f"  rucio-injector reconcile --dry-run\n"
                  f"  rucio-injector dlq list", soft_wrap=True)
