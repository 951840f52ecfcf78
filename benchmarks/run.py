"""The benchmark: every figure of the scale issue in ONE run against a real Rucio server, side by side.

    .venv/bin/python benchmarks/run.py [--quick] [--json results.json]

Starts a throw-away Rucio server (the testbed: PostgreSQL when it answers) and uses the local RabbitMQ with a
throw-away topology. In one run, on the same server:
  * naive    : per file add_replicas(1) + attach_dids(1) + list_did_rules: the loop a first script writes;
  * ceiling  : add_replicas(1000) + attach_dids(1000), nothing else: Rucio's raw bulk rate, no broker;
  * ingest   : `ingest` from a full queue to "attached and acked" (one consumer), with its Rucio time per call
               (and the DAQ's publish rate that filled the queue: outbox, then confirmed by the broker);
  * cleanup  : cleanup's work with the real server and real replicas, per batch as the consumer does it:
               transfer-done → verified release, then (sources deleted) deletion-done → file-archived;
  * paced    : a DAQ publishing at a steady rate through ingest: file-closed → replica + attachment + rule in
               Rucio (the batch returned from Rucio), p50/p99;
  * memory   : peak RSS of an `rucio-injector ingest` process with a small and a large backlog waiting;
  * history  : one reconcile sweep (and one `status`) with the same open files and 0 / 10k / 100k archived files
               in the stream's history (the first sweep over new history, which marks its datasets, is shown too).
Prints a table with the ratios and writes JSON. `--quick` (CI): a few hundred files, so the script never rots.
Nothing is asserted: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kombu

from consumers.cleanup import cleanup
from consumers.services import ingest_worker
from injector import marks, topology
from injector.config import RUCIO_BULK, Settings, parse
from injector.events import FileClosed, RucioEvent
from injector.gateway import ClientGateway, chunks
from injector.testbed.rses import create_rses
from injector.testbed.rucio import RucioServer, ensure_server_venv, start_server
from operations import reconcile, status
from producers.publish import DaqPublisher

SOURCE, ARCHIVE, SCOPE = "BENCH-BUFFER", "BENCH-ARCHIVE", "bench"
RULES = [{"copies": 1, "rse_expression": ARCHIVE, "account": "root"}]  # the server wants the owner in add_dataset


@dataclass(frozen=True)
class Sizes:
    naive: int
    ingest: int
    cleanup: int
    paced_rates: tuple[float, ...]
    paced_seconds: float
    backlogs: tuple[int, int]
    memory_seconds: float
    open_files: int
    history: tuple[int, ...]


FULL = Sizes(naive=300, ingest=5000, cleanup=2000, paced_rates=(100, 200), paced_seconds=60, backlogs=(1000, 100_000),
             memory_seconds=30, open_files=1000, history=(0, 10_000, 100_000))
QUICK = Sizes(naive=50, ingest=300, cleanup=500, paced_rates=(50,), paced_seconds=5, backlogs=(100, 1000),
              memory_seconds=8, open_files=100, history=(0, 1000, 2000))


@dataclass
class Bench:
    """The shared server, its client, the RSEs' directories and a throw-away broker topology."""

    server: RucioServer
    client: Any
    buffer: Path
    amqp: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    results: dict[str, Any] = field(default_factory=dict)

    def settings(self, name: str, dataset: str, **over: Any) -> Settings:
        """A config of its own (queue, exchanges, stream) for one section."""
        t = f"bench-{self.tag}-{name}"
        return parse({
            "broker": {"urls": [self.amqp], "daq_exchange": f"{t}.daq", "dead_letter_exchange": f"{t}.dlx"},
            "ingest": {"queue": f"{t}.ingest", **over.pop("ingest", {})},
            "cleanup": {"queue": f"{t}.cleanup"},
            "metrics": {"ingest_port": 0},
            "outbox": {"path": str(self.buffer.parent / f"{t}.outbox")},
            "streams": [{"name": name, "site": "ORM", "instrument": "LST1", "source_rse": SOURCE,
                         "storage_root": str(self.buffer / name), "pfn_prefix": "file://localhost", "scope": SCOPE,
                         "dataset": dataset, "rules": [{"rse_expression": ARCHIVE, "copies": 1}], **over}]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few hundred files (CI): checks the script, not figures")
    ap.add_argument("--json", type=Path, default=Path("benchmark-results.json"), help="where to write the figures")
    ap.add_argument("--amqp", default=os.environ.get("RUCIO_INJECTOR_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    ap.add_argument("--only", action="append", default=[],
                    choices=["naive", "ceiling", "ingest", "cleanup", "paced", "memory", "history"],
                    help="run only these sections (repeatable; default all)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    wanted = set(args.only) or {"naive", "ceiling", "ingest", "cleanup", "paced", "memory", "history"}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rucio-injector-bench-") as tmp, \
            start_server(Path(tmp) / "rucio", venv_python=ensure_server_venv()) as server:
        os.environ["RUCIO_CONFIG"] = str(server.client_config)
        from rucio.client import Client

        client = Client()
        buffer, _ = create_rses(client, Path(tmp) / "data", source=SOURCE, archive=ARCHIVE)
        client.add_scope("root", SCOPE)
        bench = Bench(server, client, buffer, args.amqp)
        bench.results["machine"] = machine(server)
        for name, section in (("naive", naive), ("ceiling", ceiling), ("ingest", ingest), ("cleanup", cleanup_run),
                              ("paced", paced), ("memory", memory), ("history", history)):
            if name in wanted:
                print(f"--- {name}", flush=True)
                bench.results[name] = section(bench, sizes)
                print(f"    {json.dumps(bench.results[name], default=str)}", flush=True)
                args.json.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")  # so far
    bench.results["seconds"] = round(time.monotonic() - started, 1)
    bench.results["quick"] = args.quick
    table(bench.results)
    args.json.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    print(f"figures written to {args.json}")
    return 0


def machine(server: RucioServer) -> dict[str, Any]:
    version = subprocess.run([str(server.venv_python), "-c", "import rucio.version as v; print(v.version_string())"],
                             capture_output=True, text=True).stdout.strip()
    broker = "?"
    try:
        out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30).stdout.strip()
        broker = f"RabbitMQ {out}" if out else broker
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "cores": os.cpu_count(), "rucio_server": version,
            "database": "SQLite" if server.database == "sqlite" else "PostgreSQL", "broker": broker,
            "python": platform.python_version()}


# --- files -------------------------------------------------------------------------------------------------------

def fake_events(bench: Bench, stream: str, night: str, n: int, start: int = 0) -> list[FileClosed]:
    """file-closed events of files that exist only in name (ingest never reads the bytes): fast to make by the
    hundred thousand; their adler32 is of the name."""
    root = bench.buffer / stream / night
    out = []
    for i in range(start, start + n):
        path = f"{root}/LST-1.1.Run{i:06d}.fits.fz"
        out.append(FileClosed.create(site="ORM", instrument="LST1", path=path, size=1000 + i,
                                     adler32=f"{zlib.adler32(path.encode()):08x}", night=night, run=i))
    return out


def replica_dicts(events: Sequence[FileClosed], rse: str, meta: Callable[[FileClosed], dict[str, Any]] | None = None
                  ) -> list[dict[str, Any]]:
    out = []
    for e in events:
        d: dict[str, Any] = {"scope": SCOPE, "name": e.path, "bytes": e.size, "adler32": e.adler32}
        if rse == SOURCE:
            d["pfn"] = f"file://localhost{e.path}"
        if meta is not None:
            d["meta"] = meta(e)
        out.append(d)
    return out


# --- sections ----------------------------------------------------------------------------------------------------

def naive(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """One file at a time, as a first script would: register, attach, look at the dataset's rules."""
    dataset = f"naive-{bench.tag}"
    bench.client.add_dataset(SCOPE, dataset, rules=RULES)
    events = fake_events(bench, "naive", "20261101", sizes.naive)
    t0 = time.perf_counter()
    for e in events:
        bench.client.add_replicas(SOURCE, replica_dicts([e], SOURCE))
        bench.client.attach_dids(SCOPE, dataset, [{"scope": SCOPE, "name": e.path}])
        list(bench.client.list_did_rules(SCOPE, dataset))
    return rate(len(events), time.perf_counter() - t0, "files")


def ceiling(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Rucio's raw bulk rate: add_replicas of 1000 and attach_dids of 1000, no metadata, no broker."""
    dataset = f"ceiling-{bench.tag}"
    bench.client.add_dataset(SCOPE, dataset, rules=RULES)
    events = fake_events(bench, "ceiling", "20261101", sizes.ingest)
    t0 = time.perf_counter()
    for part in chunks(events, RUCIO_BULK):
        bench.client.add_replicas(SOURCE, replica_dicts(part, SOURCE))
        bench.client.attach_dids(SCOPE, dataset, [{"scope": SCOPE, "name": e.path} for e in part])
    return rate(len(events), time.perf_counter() - t0, "files")


def ingest(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    s = bench.settings("ingest", "LST1_{night}_ingest")
    events = fake_events(bench, "ingest", "20261102", sizes.ingest)
    with topology_of(bench, s):
        t0 = time.perf_counter()
        publish(s, events)
        published = time.perf_counter() - t0
        worker = ingest_worker(s)
        t0 = time.perf_counter()
        with running(worker):
            wait(lambda: worker.stats.messages >= len(events), 3600)
            seconds = time.perf_counter() - t0
        attached = sum(1 for _ in bench.client.list_content(SCOPE, "LST1_20261102_ingest"))
    out = rate(len(events), seconds, "files")
    out["publish_per_s"] = round(len(events) / published)  # the DAQ side: outbox, then confirmed by the broker
    out["attached"] = attached
    out["outcomes"] = dict(worker.stats.outcomes)
    out["rucio_seconds"] = {op: round(secs, 2) for op, secs, _ in rucio_time(worker.metrics.registry)}
    return out


def cleanup_run(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Files registered at the source with their archive replica AVAILABLE (as a finished transfer leaves it);
    their transfer-done events through `cleanup` in the consumer's batches (verified release), then the sources
    deleted by the real reaper and their deletion-done events (file-archived built and marked). Once with one
    consumer, once with two side by side (competing consumers, each its own Rucio session), fresh files each time.
    Rucio work only: the transport's own ceiling is benchmarks/cleanup_rate.py."""
    return {str(n): cleanup_with(bench, sizes, n) for n in (1, 2)}


def cleanup_with(bench: Bench, sizes: Sizes, consumers: int) -> dict[str, Any]:
    s = bench.settings(f"cleanup{consumers}", "LST1_{night}_cleanup")
    night = "20261103"
    events = fake_events(bench, f"cleanup{consumers}", night, sizes.cleanup)
    Path(events[0].path).parent.mkdir(parents=True, exist_ok=True)
    for e in events:  # on disk, for the reaper to delete
        Path(e.path).touch()
    meta = {"injector_stream": s.streams[0].name, "injector_dataset": f"{SCOPE}:LST1_{night}_cleanup"}
    for part in chunks(events, RUCIO_BULK):
        bench.client.add_replicas(SOURCE, replica_dicts(part, SOURCE, lambda e: {**meta, "injector_path": e.path}))
        bench.client.add_replicas(ARCHIVE, replica_dicts(part, ARCHIVE))
    spent: dict[str, dict[str, float]] = {"transfer": {}, "deletion": {}}
    phase = ["transfer"]
    lock = threading.Lock()

    def observe(op: str, seconds: float, outcome: str) -> None:
        with lock:
            spent[phase[0]][op] = round(spent[phase[0]].get(op, 0.0) + seconds, 2)

    gateways = [ClientGateway(s.rucio, observe=observe) for _ in range(consumers)]

    done = [RucioEvent(event_type="transfer-done", payload={
        "scope": SCOPE, "name": e.path, "src-rse": SOURCE, "dst-rse": ARCHIVE, "checksum-adler": e.adler32})
        for e in events]
    transfer, released = shared_out(done, gateways, s)
    for _ in range(10):  # the reaper deletes the released sources, a limited number per pass
        bench.server.run_daemons("reaper", rses=[SOURCE], timeout=1800)
        if not any(Path(e.path).exists() for e in events):
            break
    deleted = [RucioEvent(event_type="deletion-done", created_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                          payload={"scope": SCOPE, "name": e.path, "rse": SOURCE, "url": f"file://localhost{e.path}"})
               for e in events]
    phase[0] = "deletion"
    deletion, archived = shared_out(deleted, gateways, s)
    return {"transfer_done": {**rate(len(done), transfer, "events"), "outcomes": released,
                              "rucio_seconds": spent["transfer"]},
            "deletion_done": {**rate(len(deleted), deletion, "events"), "outcomes": archived,
                              "rucio_seconds": spent["deletion"]},
            "batch_size": s.cleanup.batch_size, "consumers": consumers}


def shared_out(events: list[RucioEvent], gateways: list[ClientGateway], s: Settings) -> tuple[float, dict[str, int]]:
    """The events shared out among consumers, one per gateway, each in its own thread and batches as the
    consumer makes them; (seconds until all are done, outcomes)."""
    shares = [events[i::len(gateways)] for i in range(len(gateways))]
    results: list[dict[str, int]] = [{} for _ in gateways]
    failed: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = outcomes(cleanup(part, gateways[i], s) for part in chunks(shares[i], s.cleanup.batch_size))
        except BaseException as exc:  # re-raised by the caller's thread
            failed.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(gateways))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    merged: dict[str, int] = {}
    for r in results:
        for k, v in r.items():
            merged[k] = merged.get(k, 0) + v
    return time.perf_counter() - t0, merged


def paced(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """A DAQ closing files at a steady rate; latency from its publish to the batch holding the file returned from
    Rucio (replica registered, attached, the dataset's rule in place). One run per rate."""
    return {f"{rate:g}": paced_at(bench, sizes, rate) for rate in sizes.paced_rates}


def paced_at(bench: Bench, sizes: Sizes, per_s: float) -> dict[str, Any]:
    s = bench.settings(f"paced{per_s:g}", "LST1_{night}_paced")
    n = int(per_s * sizes.paced_seconds)
    events = fake_events(bench, f"paced{per_s:g}", "20261104", n)
    landed: dict[str, float] = {}
    with topology_of(bench, s):
        worker = ingest_worker(s)
        inner = worker.process

        def process(batch: list[Any]) -> Any:
            out = inner(batch)
            now = time.time()
            for d in batch:
                landed.setdefault(str(d.message_id), now)
            return out

        worker.process = process
        with running(worker):
            # The DAQ is its own process, as at a site: its publishing shares no interpreter with the consumer.
            ctx = multiprocessing.get_context("fork")
            sent_q: Any = ctx.Queue()
            daq = ctx.Process(target=paced_daq, args=(s, events, per_s, sent_q))
            daq.start()
            sent, offered = sent_q.get(timeout=sizes.paced_seconds * 10 + 120)
            daq.join(60)
            wait(lambda: len(landed) >= n, 1800)
    lat = sorted(landed[k] - sent[k] for k in sent)
    return {"rate": per_s, "seconds": sizes.paced_seconds, "files": n, "offered_per_s": round(n / offered, 1),
            "p50_ms": round(pct(lat, 0.5) * 1000), "p99_ms": round(pct(lat, 0.99) * 1000),
            "max_ms": round(lat[-1] * 1000)}


def paced_daq(s: Settings, events: Sequence[FileClosed], per_s: float, out: Any) -> None:
    """The paced DAQ (a child process): one file-closed every 1/per_s seconds; sends back when each was published
    (wall clock: the consumer is on the same host) and how long the whole took."""
    sent: dict[str, float] = {}
    with DaqPublisher.of(s) as daq:
        t0 = time.perf_counter()
        for i, e in enumerate(events):
            delay = t0 + i / per_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[str(e.event_id)] = time.time()
            daq.publish([e])
        offered = time.perf_counter() - t0
    out.put((sent, offered))


def memory(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Peak RSS of an `rucio-injector ingest` process (its own, from /proc) over the first seconds of work with a
    backlog waiting in its queue; prefetch bounds what it holds, so the backlog's size should not show."""
    out: dict[str, Any] = {}
    for backlog in sizes.backlogs:
        s = bench.settings(f"mem{backlog}", "LST1_{night}_mem")
        events = fake_events(bench, f"mem{backlog}", "20261105", backlog)
        with topology_of(bench, s):
            publish(s, events)
            out[str(backlog)] = peak_rss(bench, s, sizes.memory_seconds)
    small, large = (out[str(b)]["peak_rss_mib"] for b in sizes.backlogs)
    out["ratio"] = round(large / small, 3)
    return out


def history(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """The same open files (registered, not archived) and a growing history of archived, announced files in
    datasets of 1000 (one per night). Each step: a first sweep (it marks the new history's datasets finished),
    then the figure: a sweep and a `status` as a reconcile loop meets them a day later (`now` two days ahead, so
    the history is older than the window, as a stream's history is)."""
    s = bench.settings("hist", "LST1_{night}_hist")
    stream = s.streams[0]
    open_events = fake_events(bench, "hist", "20261231", sizes.open_files)
    ingest_direct(bench, stream.name, open_events, "LST1_20261231_hist")
    spent: dict[str, float] = {}

    def observe(op: str, seconds: float, outcome: str) -> None:
        spent[op] = round(spent.get(op, 0.0) + seconds, 2)

    gw = ClientGateway(s.rucio, observe=observe)
    later = datetime.now(UTC) + timedelta(days=2)
    made = 0
    out: dict[str, dict[str, Any]] = {}
    for size in sizes.history:
        archive_history(bench, stream.name, made, size - made)
        made = size
        first = timed(lambda: reconcile.sweep(s, gw, lambda m: None, reconcile.Options(), now=later))
        runs = []
        for _ in range(3):
            spent.clear()
            runs.append(timed(lambda: reconcile.sweep(s, gw, lambda m: None, reconcile.Options(), now=later)))
        found, last = runs[0][1], dict(spent)
        st = timed(lambda: status.collect(s, gw, now=later))
        sweep_s = round(statistics.median(r[0] for r in runs), 2)
        out[str(size)] = {"first_sweep_s": round(first[0], 2), "sweep_s": sweep_s, "findings": len(found),
                          "status_s": round(st[0], 2), "rucio_seconds_last_sweep": dict(last)}
        print(f"    history {size:>7}: first sweep {first[0]:.2f}s, sweep {out[str(size)]['sweep_s']:.2f}s, "
              f"status {st[0]:.2f}s", flush=True)
    base = out[str(sizes.history[0])]["sweep_s"]
    return {**out, "ratio": round(out[str(sizes.history[-1])]["sweep_s"] / base, 3) if base else None}


def ingest_direct(bench: Bench, stream: str, events: Sequence[FileClosed], dataset: str) -> None:
    """Open files as ingest leaves them (source replica with its marks, attached, the dataset's rule)."""
    bench.client.add_dataset(SCOPE, dataset, rules=RULES)
    for part in chunks(events, RUCIO_BULK):
        bench.client.add_replicas(SOURCE, replica_dicts(part, SOURCE, lambda e: {
            marks.STREAM: stream, marks.DATASET: f"{SCOPE}:{dataset}", marks.PATH: e.path}))
        bench.client.attach_dids(SCOPE, dataset, [{"scope": SCOPE, "name": e.path} for e in part])


def archive_history(bench: Bench, stream: str, start: int, n: int) -> None:
    """n archived files: only their archive replica left, announced, in datasets of 1000 (one per night)."""
    now = datetime.now(UTC).isoformat()
    for first in range(start, start + n, 1000):
        night = (datetime(2020, 1, 1) + timedelta(days=first // 1000)).strftime("%Y%m%d")
        dataset = f"LST1_{night}_hist"
        events = fake_events(bench, "hist", night, min(1000, start + n - first), first)
        bench.client.add_dataset(SCOPE, dataset, rules=RULES)
        done = {marks.STREAM: stream, marks.DATASET: f"{SCOPE}:{dataset}", marks.ARCHIVED_AT: now,
                marks.ANNOUNCED: now, marks.RELEASED_AT: now}
        bench.client.add_replicas(ARCHIVE, replica_dicts(events, ARCHIVE, with_path(done)))
        bench.client.attach_dids(SCOPE, dataset, [{"scope": SCOPE, "name": e.path} for e in events])


# --- helpers -----------------------------------------------------------------------------------------------------

def with_path(marks_of_all: dict[str, Any]) -> Callable[[FileClosed], dict[str, Any]]:
    return lambda e: {**marks_of_all, marks.PATH: e.path}


@contextmanager
def topology_of(bench: Bench, s: Settings) -> Iterator[None]:
    decl = topology.declare(s)
    with kombu.Connection(bench.amqp) as conn:
        topology.apply(conn, decl)
    try:
        yield
    finally:
        with kombu.Connection(bench.amqp) as conn:
            topology.remove(conn, decl)


@contextmanager
def running(worker: Any) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def publish(s: Settings, events: Sequence[FileClosed]) -> None:
    with DaqPublisher.of(s) as daq:
        for part in chunks(events, 5000):
            daq.publish(part)
        daq.flush()


def peak_rss(bench: Bench, s: Settings, seconds: float) -> dict[str, Any]:
    config = bench.buffer.parent / f"{s.ingest.queue}.toml"
    st = s.streams[0]
    config.write_text(
        f'[broker]\nurls = ["{bench.amqp}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
        f'dead_letter_exchange = "{s.broker.dead_letter_exchange}"\n[ingest]\nqueue = "{s.ingest.queue}"\n'
        f'[cleanup]\nqueue = "{s.cleanup.queue}"\n[metrics]\ningest_port = 0\n[outbox]\npath = "{s.outbox.file}"\n'
        f'[[streams]]\nname = "{st.name}"\nsite = "ORM"\ninstrument = "LST1"\nsource_rse = "{SOURCE}"\n'
        f'storage_root = "{st.storage_root}"\npfn_prefix = "file://localhost"\nscope = "{SCOPE}"\n'
        f'dataset = "{st.dataset}"\nrules = [{{ rse_expression = "{ARCHIVE}", copies = 1 }}]\n')
    proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "--config", str(config), "ingest"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end and proc.poll() is None:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(60)
    return {"peak_rss_mib": round(peak / 1024, 1), "prefetch": s.ingest.prefetch, "seconds": seconds}


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def outcomes(batches: Iterator[list[Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in batches:
        for o in batch:
            counts[o.label] = counts.get(o.label, 0) + 1
    return counts


def wait(condition: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the benchmark waited too long")
        time.sleep(0.02)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def rate(n: int, seconds: float, what: str) -> dict[str, Any]:
    return {what: n, "seconds": round(seconds, 2), "per_s": round(n / seconds, 1) if seconds else None}


def pct(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def rucio_time(registry: Any) -> list[tuple[str, float, int]]:
    """(operation, seconds, calls) from the consumer's Rucio call histogram."""
    out: dict[str, list[float]] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            op = sample.labels.get("operation")
            if op and sample.name.endswith("_sum"):
                out.setdefault(op, [0.0, 0])[0] += sample.value
            elif op and sample.name.endswith("_count"):
                out.setdefault(op, [0.0, 0])[1] += sample.value
    return sorted(((op, v[0], int(v[1])) for op, v in out.items()), key=lambda t: -t[1])


def table(r: dict[str, Any]) -> None:
    """The figures and their ratios, one line each."""
    m = r.get("machine", {})
    quick = " (--quick)" if r.get("quick") else ""
    print(f"\nrucio-injector benchmark {m.get('date')}: {m.get('cores')} cores, Rucio server {m.get('rucio_server')} "
          f"on {m.get('database')}, {m.get('broker')}, Python {m.get('python')}{quick}")
    line = "{:<58} {:>20}  {}"
    print(line.format("measure", "figure", "ratio / note"))

    def get(*path: str) -> Any:
        node: Any = r
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    nv, cl, ing = get("naive", "per_s"), get("ceiling", "per_s"), get("ingest", "per_s")
    rows = [("naive per-file loop (files/s)", nv, ""), ("raw bulk ceiling (files/s)", cl, "")]
    if ing is not None:
        ratios = ([f"{ing / nv:.1f}x naive"] if nv else []) + ([f"{ing / cl:.0%} of the ceiling"] if cl else [])
        rows.append(("ingest from a full queue (files/s)", ing, ", ".join(ratios)))
    rows.append(("DAQ publish, outbox + confirms (events/s)", get("ingest", "publish_per_s"), ""))
    for n, what in (("1", "one consumer"), ("2", "two consumers")):
        rows += [(f"cleanup transfer-done → release, {what} (events/s)",
                  get("cleanup", n, "transfer_done", "per_s"), ""),
                 (f"cleanup deletion-done → archived, {what} (events/s)",
                  get("cleanup", n, "deletion_done", "per_s"), "")]
    for p in (r.get("paced") or {}).values():
        rows.append((f"paced {p['rate']:g} files/s for {p['seconds']:g} s: p50 / p99 (ms)",
                     f"{p['p50_ms']} / {p['p99_ms']}", f"max {p['max_ms']} ms, offered {p['offered_per_s']}/s"))
    if get("memory"):
        mem = r["memory"]
        sizes = [k for k in mem if k.isdigit()]
        rows.append((f"ingest peak RSS, backlog {sizes[0]} vs {sizes[-1]} (MiB)",
                     f"{mem[sizes[0]]['peak_rss_mib']} / {mem[sizes[-1]]['peak_rss_mib']}", f"{mem['ratio']:.2f}x"))
    if get("history"):
        h = r["history"]
        sizes = [k for k in h if k.isdigit()]
        rows.append((f"reconcile sweep, history {' / '.join(sizes)} (s)",
                     " / ".join(str(h[k]["sweep_s"]) for k in sizes),
                     f"sweep({sizes[-1]})/sweep({sizes[0]}) = {h['ratio']}"))
        rows.append(("status, same histories (s)", " / ".join(str(h[k]["status_s"]) for k in sizes), ""))
        rows.append(("first sweep over new history (s)", " / ".join(str(h[k]["first_sweep_s"]) for k in sizes),
                     "marks the finished datasets, once"))
    for name, figure, note in rows:
        print(line.format(name, "-" if figure is None else str(figure), note))
    print(f"total {r.get('seconds')} s")


if __name__ == "__main__":
    sys.exit(main())
