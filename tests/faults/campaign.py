"""The fault campaign: a steady stream of real files through the whole pipeline while a seeded chaos schedule
injects faults, then a check of every file through Rucio's API and the disk, and a tally.

    .venv/bin/python -m tests.faults.campaign --minutes 10 --rate 20 --seed 1 --json faults.json   # the long run
    CI: tests/faults/test_campaign.py runs a 2-minute version (pytest -m faults)

The pipeline, all real: a Rucio server of its own (PyPI rucio on PostgreSQL) with its daemons in a loop (judge,
conveyor with the mock transfer tool copying the bytes, hermes, reaper); this machine's RabbitMQ; `rucio-injector
watch` on the DAQ buffer (durable outbox), two `ingest` and two `cleanup` processes racing, `reconcile --every`;
a DAQ thread closing files at a steady rate. The consumers reach RabbitMQ through a TCP proxy (cut on demand) and
Rucio through an HTTP proxy (503 on demand); hermes reaches RabbitMQ's STOMP through a proxy that duplicates,
shuffles or drops its frames on demand.

Fault kinds: kill -9 of an ingest, a cleanup, the watcher or the reconciler (restarted at once or after a pause);
`rabbitmqctl close_all_connections`; RabbitMQ `stop_app` ... `start_app`; the consumers' broker connections cut;
the Rucio server stopped, and Rucio answering 503; hermes' frames duplicated, shuffled or dropped (lost
transfer-done / deletion-done events, finished by the reconcile loop); an invalid event published (its dead
letter is expected). Everything stopped is restored in `finally` blocks.

At the end it waits for quiescence and checks: every file registered once (one DID), archived once (the archive
replica's bytes on disk have the announced adler32), its source deleted (from Rucio and from the disk), announced
to the DAQ with exactly one distinct file-archived event_id (deliveries of it may repeat: at-least-once), and no
dead letter but the injected bad events. The tally (printed, and written as JSON): faults injected (by kind), files,
lost, duplicated, dead-lettered, max time-to-archive.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.rabbit import rabbitmqctl

SOURCE, ARCHIVE = "ORM-BUFFER", "PIC-ARCHIVE"
AMQP = ("127.0.0.1", 5672)
RABBIT_STOMP = ("127.0.0.1", 61613)
DAEMON_PASS = ("judge-evaluator", "submitter", "poller", "finisher", "hermes", "reaper", "hermes")
KINDS = ("kill-ingest", "kill-cleanup", "kill-watch", "kill-reconcile", "broker-close-connections",
         "broker-restart", "broker-cut", "rucio-stop", "rucio-503", "hermes-duplicate", "hermes-shuffle",
         "hermes-drop", "bad-event", "partition")
ACTIVEMQ_KINDS = ("activemq-restart", "stomp-cut")  # with hermes on ActiveMQ (--hermes-broker activemq)
DAQ_SITE = ("watch", "ingest-1", "ingest-2")  # run inside the DAQ "site" (a network namespace) for `partition`


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    files: int = 0
    lost: int = 0
    duplicated: int = 0
    dead_lettered: int = 0
    injected_bad: int = 0
    max_time_to_archive: float = 0.0
    file_archived_deliveries: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        return (f"faults injected {sum(self.faults.values())} ({kinds}), files {self.files}, lost {self.lost}, "
                f"duplicated {self.duplicated}, dead-lettered {self.dead_lettered} (+{self.injected_bad} injected "
                f"bad events, all dead-lettered), max time-to-archive {self.max_time_to_archive:.1f}s")

    def as_json(self) -> dict[str, Any]:
        return {"faults": dict(self.faults), "faults_total": sum(self.faults.values()), "files": self.files,
                "lost": self.lost, "duplicated": self.duplicated, "dead_lettered": self.dead_lettered,
                "injected_bad_events": self.injected_bad, "max_time_to_archive_s": round(self.max_time_to_archive, 2),
                "file_archived_deliveries": self.file_archived_deliveries, "seconds": round(self.seconds, 1),
                "problems": self.problems[:50]}


def adler32(path: Path) -> str:
    value = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return f"{value & 0xFFFFFFFF:08x}"


class Campaign:
    def __init__(self, work: Path, minutes: float, rate: float, seed: int, kinds: tuple[str, ...] = KINDS,
                 faults: int | None = None, quiesce: float = 600.0, outage_cap: float = 120.0,
                 say: Callable[[str], None] = print, hermes_broker: str = "rabbitmq") -> None:
        self.work, self.minutes, self.rate, self.seed = work, minutes, rate, seed
        self.hermes_broker = hermes_broker
        if hermes_broker == "activemq" and kinds == KINDS:
            kinds = KINDS + ACTIVEMQ_KINDS
        self.kinds, self.quiesce, self.outage_cap, self.say = kinds, quiesce, outage_cap, say
        self.n_faults = faults if faults is not None else max(len(kinds), int(minutes * 6))
        self.rng = random.Random(seed)
        self.tag = uuid.uuid4().hex[:6]
        self.tally = Tally()
        self.stop = threading.Event()
        self.writing_done = threading.Event()
        self.closed: dict[str, tuple[float, int, str]] = {}  # path -> (closed at, size, adler32)
        self.archived: dict[str, list[tuple[str, float]]] = defaultdict(list)  # name -> [(event_id, received)]
        self.bad_ids: set[str] = set()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.errors: list[str] = []

    # ---- set-up -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        from rucio.client import Client

        from injector.testbed.rses import create_rses
        from injector.testbed.rucio import PASSWORD, USERNAME, ensure_server_venv, start_server
        from tests.faults.sites import Site
        from tests.faults.stompfault import HermesFault
        from tests.integration.httpfault import RucioProxy
        from tests.integration.netfault import Proxy

        with contextlib.ExitStack() as stack:
            self.say(f"campaign {self.tag}: starting a Rucio server of its own")
            self.server = stack.enter_context(start_server(self.work / "rucio", venv_python=ensure_server_venv(),
                                                           database="postgresql"))
            self.client = Client(rucio_host=self.server.url, auth_host=self.server.url, account="root",
                                 auth_type="userpass", creds={"username": USERNAME, "password": PASSWORD})
            self.source_dir, self.archive_dir = create_rses(self.client, self.work / "data", source=SOURCE,
                                                            archive=ARCHIVE)
            self.client.add_scope("root", "lst")
            self.root = self.source_dir / "LST1"
            self.root.mkdir()
            # The archive side (cleanup, reconcile) on this host; the DAQ side (watch, ingest) in a site of its own
            # when a partition is among the faults, reaching the services through proxies on its link's host end.
            self.site = stack.enter_context(Site(self.tag)) if "partition" in self.kinds else None
            here = "127.0.0.1"
            there = self.site.host_ip if self.site else here
            self.rucio_proxies = {side: RucioProxy(self.server.url, host) for side, host in (("archive", here),
                                                                                             ("daq", there))}
            self.amqp_proxies = {side: Proxy(AMQP, host) for side, host in (("archive", here), ("daq", there))}
            for rp in self.rucio_proxies.values():
                stack.callback(rp.close)
            for ap in self.amqp_proxies.values():
                stack.callback(ap.close)
            self.rucio_configs = {side: p.client_config(self.server.client_config, self.work / f"rucio-{side}.cfg")
                                  for side, p in self.rucio_proxies.items()}
            hermes_upstream = RABBIT_STOMP
            self.stomp_proxy: Proxy | None = None
            if self.hermes_broker == "activemq":
                from injector.testbed.activemq import start_activemq

                self.activemq = stack.enter_context(start_activemq(self.work / "activemq"))
                hermes_upstream = ("127.0.0.1", self.activemq.stomp_port)
                self.stomp_proxy = Proxy(hermes_upstream)
                stack.callback(self.stomp_proxy.close)
            self.hermes_proxy = HermesFault(hermes_upstream, seed=self.seed)
            stack.callback(self.hermes_proxy.close)
            self.configs = {side: self._write_config(side) for side in ("archive", "daq")}
            self.config = self.configs["archive"]
            from injector import config, topology
            from injector.transport.amqp import connection

            self.settings = config.load(self.config)
            direct = self.settings.broker.model_copy(update={"urls": [f"amqp://guest:guest@{AMQP[0]}:{AMQP[1]}//"]})
            self.direct = direct
            with connection(direct) as conn:
                topology.apply(conn, topology.declare(self.settings))
            stack.callback(self._remove_topology)
            stack.callback(self._stop_all)
            yield

    def _write_config(self, side: str) -> Path:
        t = self.tag
        proxy = self.amqp_proxies[side]
        host = proxy.server.getsockname()[0]
        if self.stomp_proxy is not None:
            cleanup = (f'flavour = "activemq"\nstomp_hosts = ["127.0.0.1:{self.stomp_proxy.port}"]\n'
                       f'hermes_destination = "/topic/VirtualTopic.rucio.events"\napp = "rucio-injector"\n')
        else:
            cleanup = (f'flavour = "rabbitmq"\nqueue = "camp-{t}.cleanup"\n'
                       f'hermes_destination = "/topic/camp-{t}.rucio.events"\n')
        text = f"""
[broker]
urls = ["amqp://guest:guest@{host}:{proxy.port}//"]
daq_exchange = "camp-{t}.daq"
dead_letter_exchange = "camp-{t}.dlx"
heartbeat = 10
delivery_limit = 20
outage_hold = 60
[ingest]
queue = "camp-{t}.ingest"
batch_window = 0.2
[cleanup]
{cleanup}batch_window = 0.2
[rucio]
timeout = 30
probe_cap = 5
[outbox]
path = "{self.work}/outbox.sqlite"
[metrics]
ingest_port = 0
cleanup_port = 0
reconcile_port = 0
[[streams]]
name = "lst1-raw"
site = "ORM"
instrument = "LST1"
source_rse = "{SOURCE}"
storage_root = "{self.root}"
scope = "lst"
did_name = "path"
dataset = "CAMP_{t}_{{date}}_raw"
rules = [{{ rse_expression = "{ARCHIVE}", copies = 1, activity = "User Subscriptions" }}]
"""
        path = self.work / f"injector-{side}.toml"
        path.write_text(text)
        return path

    def _remove_topology(self) -> None:
        from injector import topology
        from injector.transport.amqp import connection

        with contextlib.suppress(Exception), connection(self.direct) as conn:
            topology.remove(conn, topology.declare(self.settings))

    # ---- processes --------------------------------------------------------------------------------------------
    COMMANDS: dict[str, tuple[str, ...]] = {
        "ingest-1": ("ingest",), "ingest-2": ("ingest",), "cleanup-1": ("cleanup",), "cleanup-2": ("cleanup",),
        "watch": ("watch", "--existing"), "reconcile": ("reconcile", "--every", "10", "--grace", "20"),
    }

    def start(self, name: str) -> None:
        side = "daq" if name in DAQ_SITE else "archive"
        env = {**os.environ, "RUCIO_CONFIG": str(self.rucio_configs[side]),
               "RUCIO_INJECTOR_CONFIG": str(self.configs[side]), "PYTHONUNBUFFERED": "1"}
        inside = self.site.prefix() if self.site is not None and side == "daq" else []
        log = open(self.work / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen([*inside, sys.executable, "-m", "injector.cli", *self.COMMANDS[name]],
                                            env=env, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def _stop_all(self) -> None:
        from injector.testbed.rucio import stop_group

        for proc in self.procs.values():
            stop_group(proc, grace=30)

    def _check_processes(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and code != -signal.SIGKILL:
                self.errors.append(f"{name} exited by itself with {code} (see logs/{name}.log)")
                self.start(name)

    # ---- the steady load --------------------------------------------------------------------------------------
    def daq(self) -> None:
        """Files closed at `rate` per second in the buffer the watcher watches."""
        day = time.strftime("%Y%m%d", time.gmtime())
        directory = self.root / day
        directory.mkdir(parents=True, exist_ok=True)
        rng = random.Random(self.seed + 1)
        end = time.monotonic() + self.minutes * 60
        i = 0
        next_at = time.monotonic()
        while time.monotonic() < end and not self.stop.is_set():
            path = directory / f"LST-1.1.Run{self.seed:03d}{i:06d}.fits.fz"
            data = rng.randbytes(rng.randint(1, 64 * 1024))
            path.write_bytes(data)
            with self.lock:
                self.closed[str(path)] = (time.time(), len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")
            i += 1
            next_at += 1.0 / self.rate
            self.stop.wait(max(next_at - time.monotonic(), 0))
        self.writing_done.set()

    def daemons(self) -> None:
        from injector.testbed.rucio import HermesBroker, TestbedError

        hermes = HermesBroker(port=self.hermes_proxy.port, destination=self.settings.cleanup.hermes_destination)
        while not self.stop.is_set():
            try:
                self.server.run_daemons(*DAEMON_PASS, rses=[SOURCE, ARCHIVE], hermes=hermes, stop=self.stop)
            except TestbedError as exc:  # a pass during a fault (the database is fine; hermes' broker may not be)
                self.say(f"  (a daemons pass failed: {str(exc).splitlines()[0]})")
            self.stop.wait(0.5)

    def inbox(self) -> None:
        """The DAQ's side: file-archived events, every delivery kept (by event_id)."""
        from injector import topology
        from injector.events import decode_file_archived
        from injector.transport.amqp import connection

        queue = topology.archived_queue(self.settings)
        while not self.stop.is_set():
            try:
                with connection(self.direct) as conn:
                    channel = conn.channel()
                    while not self.stop.is_set():
                        msg = channel.basic_get(queue)
                        if msg is None:
                            self.stop.wait(0.2)
                            continue
                        ev = decode_file_archived(msg.body)
                        with self.lock:
                            self.archived[ev.name].append((str(ev.event_id), time.time()))
                        channel.basic_ack(msg.delivery_tag)
            except Exception:  # the broker restarting: read again when it is back
                self.stop.wait(1.0)

    # ---- the chaos --------------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[float, str]]:
        """Fault times spread over the writing period (seeded); every kind at least once."""
        span = self.minutes * 60
        kinds = list(self.kinds) + [self.rng.choice(self.kinds) for _ in range(self.n_faults - len(self.kinds))]
        self.rng.shuffle(kinds)
        slots = sorted(self.rng.uniform(0.05, 0.9) * span for _ in kinds)
        return list(zip(slots, kinds, strict=True))

    def chaos(self) -> None:
        started = time.monotonic()
        for at, kind in self.schedule():
            if self.stop.wait(max(at - (time.monotonic() - started), 0)):
                return
            self.say(f"  t={time.monotonic() - started:6.1f}s fault {kind}")
            try:
                self.inject(kind)
            except Exception as exc:
                self.errors.append(f"fault {kind} could not be injected or restored: {type(exc).__name__}: {exc}")
            self.tally.faults[kind] += 1

    def pause(self, low: float, high: float) -> float:
        return self.rng.uniform(low, min(high, self.outage_cap))

    def inject(self, kind: str) -> None:
        if kind.startswith("kill-"):
            self._kill_and_restart(kind.removeprefix("kill-"))
        elif kind.startswith("hermes-"):
            mode: Any = kind.removeprefix("hermes-")
            self._outage(lambda: self.hermes_proxy.set(mode), lambda: self.hermes_proxy.set("pass"), 10, 40)
        else:
            self._faults()[kind]()

    def _faults(self) -> dict[str, Callable[[], None]]:
        return {
            "broker-close-connections": lambda: rabbitmqctl("close_all_connections", "fault campaign"),
            "broker-restart": lambda: self._outage(lambda: rabbitmqctl("stop_app"), self._start_rabbitmq, 3, 20),
            "broker-cut": self._cut_broker,
            "rucio-stop": lambda: self._outage(self.server.halt, self.server.serve, 5, 120),
            "rucio-503": lambda: self._outage(lambda: self._rucio_503(True), lambda: self._rucio_503(False), 5, 60),
            "partition": lambda: self._outage(self._site().cut, self._site().heal, 30, 60),
            "activemq-restart": lambda: self.activemq.restart(),
            "stomp-cut": self._cut_stomp,
            "bad-event": self._bad_event,
        }

    def _cut_broker(self) -> None:
        for proxy in self.amqp_proxies.values():
            proxy.drop()

    def _cut_stomp(self) -> None:
        if self.stomp_proxy is None:
            raise ValueError("stomp-cut needs hermes on ActiveMQ (--hermes-broker activemq)")
        self.stomp_proxy.drop()

    def _rucio_503(self, on: bool) -> None:
        for proxy in self.rucio_proxies.values():
            proxy.unavailable = on

    def _outage(self, begin: Callable[[], None], end: Callable[[], None], low: float, high: float) -> None:
        """Break something, wait, and restore it whatever happens meanwhile."""
        begin()
        try:
            self.stop.wait(self.pause(low, high))
        finally:
            end()

    def _kill_and_restart(self, role: str) -> None:
        name = self.rng.choice([n for n in self.procs if n.startswith(role)])
        self.kill(name)
        self.stop.wait(self.rng.choice([0.0, 1.0, 5.0]))
        self.start(name)

    @staticmethod
    def _start_rabbitmq() -> None:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")

    def _site(self) -> Any:
        if self.site is None:
            raise ValueError("no DAQ site: the partition fault needs one")
        return self.site

    def _bad_event(self) -> None:
        from injector.messages import Outgoing
        from injector.transport import plugin

        mid = f"bad-{uuid.uuid4().hex}"
        sender = plugin("amqp").sender(self.direct, None)
        try:
            sender.publish([Outgoing(self.settings.broker.daq_exchange, "file.closed.ORM.LST1",
                                     b'{"schema": "file-closed/1", "size": "big"}', {}, mid)])
        finally:
            sender.close()
        self.bad_ids.add(mid)

    # ---- the run ----------------------------------------------------------------------------------------------
    def run(self) -> Tally:
        """The whole campaign; a SIGTERM ends it through the `finally` blocks (RabbitMQ started again, Rucio served
        again, every process stopped, the site's namespace removed)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupted)
        started = time.monotonic()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        with self.pipeline():
            for name in self.COMMANDS:
                self.start(name)
            threads = [threading.Thread(target=t, name=t.__name__, daemon=True)
                       for t in (self.daemons, self.inbox)]
            writer = threading.Thread(target=self.daq, name="daq", daemon=True)
            chaos = threading.Thread(target=self.chaos, name="chaos", daemon=True)
            for t in (*threads, writer, chaos):
                t.start()
            try:
                while not self.writing_done.wait(2.0):
                    self._check_processes()
                chaos.join()
                self.say(f"campaign {self.tag}: {len(self.closed)} files written; waiting for quiescence")
                deadline = time.monotonic() + self.quiesce
                while time.monotonic() < deadline and not self._quiet():
                    self._check_processes()
                    time.sleep(2.0)
                time.sleep(5.0)  # a late duplicate would arrive now
            finally:
                self.stop.set()
                chaos.join(180)  # a fault in progress restores what it broke (RabbitMQ, Rucio, the site's link)
                for t in threads:
                    t.join(60)
            self.check()
        self.tally.seconds = time.monotonic() - started
        return self.tally

    def _quiet(self) -> bool:
        with self.lock:
            missing = [p for p in self.closed if p not in self.archived]
        return not missing

    @staticmethod
    def _wrong(path: str, size: int, adler: str, rep: dict[str, Any] | None,
               events: list[tuple[str, float]]) -> list[str]:
        """What is wrong with one file at the end (nothing: registered, archived, source gone, announced once)."""
        why = []
        if rep is None:
            why.append("not registered")
        else:
            states = rep.get("states", {})
            if states.get(ARCHIVE) != "AVAILABLE":
                why.append(f"archive replica {states.get(ARCHIVE)}")
            if SOURCE in states:
                why.append(f"source replica still {states[SOURCE]}")
            if (rep.get("bytes"), rep.get("adler32")) != (size, adler):
                why.append(f"Rucio holds {rep.get('bytes')}/{rep.get('adler32')}, the DAQ closed {size}/{adler}")
            pfns = rep.get("rses", {}).get(ARCHIVE, [])
            copy = Path(pfns[0].removeprefix("file://localhost")) if pfns else None
            if copy is None or not copy.exists() or adler32(copy) != adler:
                why.append(f"archive copy on disk missing or different ({copy})")
        if Path(path).exists():
            why.append("source file still on disk")
        if not events:
            why.append("never announced")
        elif len({eid for eid, _ in events}) != 1:
            why.append(f"announced with {len({eid for eid, _ in events})} different event ids")
        return why

    def check(self) -> None:
        """Every file through Rucio's API and the disk; the DLQs; the inbox."""
        from injector import topology
        from operations.dlq import RabbitDlq, dlq_for

        t = self.tally
        t.files = len(self.closed)
        names = [p for p in self.closed]
        dids = {d["name"] if isinstance(d, dict) else d
                for d in self.client.list_dids("lst", {"name": f"{self.root}/*"}, did_type="file")}
        extra = dids - set(names)
        if extra:
            t.problems.append(f"{len(extra)} DID(s) registered that the DAQ never closed, e.g. {sorted(extra)[:3]}")
        replicas: dict[str, dict[str, Any]] = {}
        for i in range(0, len(names), 500):
            chunk = [{"scope": "lst", "name": n} for n in names[i:i + 500]]
            for rep in self.client.list_replicas(chunk, all_states=True):
                replicas[rep["name"]] = rep
        for path, (closed_at, size, adler) in self.closed.items():
            events = self.archived.get(path, [])
            why = self._wrong(path, size, adler, replicas.get(path), events)
            if len({eid for eid, _ in events}) > 1:
                t.duplicated += 1
            if why:
                t.lost += 1
                t.problems.append(f"{path}: {'; '.join(why)}")
            else:
                t.max_time_to_archive = max(t.max_time_to_archive, min(at for _, at in events) - closed_at)
        t.file_archived_deliveries = sum(len(v) for v in self.archived.values())
        ingest_dlq = topology.dead_letter_queue(self.settings.ingest.queue)
        dead = RabbitDlq(self.direct).peek(ingest_dlq)
        cleanup_dlq = topology.dead_letters_of(self.settings, self.settings.cleanup.consumer_queue)
        dead += dlq_for(self.settings, cleanup_dlq).peek(cleanup_dlq)
        t.injected_bad = len(self.bad_ids)
        found_bad = {r.id for r in dead if r.id in self.bad_ids}
        if found_bad != self.bad_ids:
            t.problems.append(f"{len(self.bad_ids - found_bad)} injected bad event(s) not dead-lettered")
        others = [r for r in dead if r.id not in self.bad_ids]
        t.dead_lettered = len(others)
        t.problems += [f"dead letter {r.id} ({r.reason}): {r.error[:200]}" for r in others[:20]]
        t.problems += self.errors


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the DAQ writes files (default 10)")
    p.add_argument("--rate", type=float, default=20.0, help="files closed per second (default 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", type=int, help="faults to inject (default: 6 per minute, every kind at least once)")
    p.add_argument("--kinds", help=f"comma-separated (default: all: {','.join(KINDS)}, and with ActiveMQ "
                                   f"{','.join(ACTIVEMQ_KINDS)})")
    p.add_argument("--hermes-broker", choices=("rabbitmq", "activemq"), default="activemq",
                   help="where hermes publishes and cleanup consumes (default activemq: its faults too)")
    p.add_argument("--quiesce", type=float, default=900.0, help="seconds to wait for quiescence after writing")
    p.add_argument("--outage-cap", type=float, default=120.0, help="longest outage of one fault (s)")
    p.add_argument("--work", type=Path, help="working directory (default: a new one under /tmp)")
    p.add_argument("--json", type=Path, help="write the tally here")
    a = p.parse_args(argv)
    work = a.work or Path(f"/tmp/fault-campaign-{uuid.uuid4().hex[:6]}")
    work.mkdir(parents=True, exist_ok=True)
    kinds = tuple(a.kinds.split(",")) if a.kinds else KINDS
    c = Campaign(work, a.minutes, a.rate, a.seed, kinds, a.faults, a.quiesce, a.outage_cap,
                 hermes_broker=a.hermes_broker)
    tally = c.run()
    print(tally.line())
    for problem in tally.problems[:30]:
        print(f"  problem: {problem}")
    if a.json:
        a.json.write_text(json.dumps(tally.as_json(), indent=2) + "\n")
    print(f"logs: {work}/logs")
    return 0 if not tally.problems and tally.lost == 0 and tally.duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
