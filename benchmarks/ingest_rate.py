"""Benchmark: DAQ publish rate and end-to-end ingest rate into a REAL Rucio server.

    .venv/bin/python benchmarks/ingest_rate.py [--files 5000] [--latency-samples 20]

Starts a throw-away Rucio server (testbed, PostgreSQL when present) and uses the local RabbitMQ
with a throw-away topology. Prints:
  * publish: file-closed events/s with publisher confirms (checksums precomputed),
  * ingest: files/s from a full queue to "attached in Rucio and acked" (one ingest process),
  * latency: publish of ONE file → its replica is in Rucio, p50/p99 over single files.
Nothing here is asserted; it prints figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import kombu

from consumers.services import ingest_worker
from injector import topology
from injector.config import Settings, parse
from injector.testbed.rses import create_rses
from injector.testbed.rucio import ensure_server_venv, start_server
from producers.publish import DaqPublisher, file_closed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--latency-samples", type=int, default=20)
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp, \
            start_server(Path(tmp) / "rucio", venv_python=ensure_server_venv()) as server:
        os.environ["RUCIO_CONFIG"] = str(server.client_config)
        from rucio.client import Client

        client = Client()
        buffer, _ = create_rses(client, Path(tmp) / "data", source="BENCH-BUFFER", archive="BENCH-ARCHIVE")
        client.add_scope("root", "bench")
        tag = uuid.uuid4().hex[:8]
        settings = parse({
            "broker": {"urls": [args.amqp], "daq_exchange": f"bench-{tag}.daq",
                       "dead_letter_exchange": f"bench-{tag}.dlx"},
            "ingest": {"queue": f"bench-{tag}.ingest"},
            "metrics": {"ingest_port": 0},
            "streams": [{"name": "bench", "site": "ORM", "instrument": "LST1", "source_rse": "BENCH-BUFFER",
                         "storage_root": str(buffer), "pfn_prefix": "file://localhost", "scope": "bench",
                         "dataset": "LST1_{night}_bench",
                         "rules": [{"rse_expression": "BENCH-ARCHIVE", "copies": 1}]}],
        })
        decl = topology.declare(settings)
        with kombu.Connection(args.amqp) as conn:
            topology.apply(conn, decl)
        try:
            run(settings, buffer, args.files, args.latency_samples, client)
        finally:
            with kombu.Connection(args.amqp) as conn:
                topology.remove(conn, decl)
    return 0


def run(settings: Settings, buffer: Path, n: int, samples: int, client: Any) -> None:
    night = "20261125"
    (buffer / night).mkdir(parents=True)
    print(f"writing {n} files and computing adler32 ...", flush=True)
    events = []
    for i in range(n):
        p = buffer / night / f"LST-1.1.Run{i:06d}.fits.fz"
        p.write_bytes(i.to_bytes(8, "big") * 64)
        events.append(file_closed(p, site="ORM", instrument="LST1", night=night, run=i))

    with DaqPublisher(settings.broker, outbox=settings.outbox) as daq:
        t0 = time.perf_counter()
        daq.publish(events)
        put = time.perf_counter() - t0
        daq.flush()
        pub = time.perf_counter() - t0
    print(f"publish : {n} events in {pub:.2f}s = {n / pub:,.0f} events/s (outbox write {put:.2f}s; then "
          "persistent, confirmed)")

    worker = ingest_worker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    t0 = time.perf_counter()
    thread.start()
    while worker.stats.messages < n:
        time.sleep(0.05)
    ing = time.perf_counter() - t0
    print(f"ingest  : {n} files in {ing:.2f}s = {n / ing:,.0f} files/s "
          f"({worker.stats.batches} batches, outcomes {worker.stats.outcomes})")
    print("          time in Rucio calls: " + ", ".join(
        f"{op} {secs:.1f}s/{n}" for op, secs, n in rucio_time(worker.metrics.registry)))
    attached = sum(1 for _ in client.list_content("bench", f"LST1_{night}_bench"))
    print(f"          Rucio says: {attached} files attached to bench:LST1_{night}_bench")

    lat = []
    with DaqPublisher(settings.broker, outbox=settings.outbox) as daq:
        for i in range(samples):
            p = buffer / night / f"single-{i}.fits.fz"
            p.write_bytes(b"single" * 100 + bytes([i]))
            ev = file_closed(p, site="ORM", instrument="LST1", night=night, run=100000 + i)
            t0 = time.perf_counter()
            daq.publish([ev])
            while not list(client.list_replicas([{"scope": "bench", "name": str(p)}])):
                time.sleep(0.005)
            lat.append(time.perf_counter() - t0)
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    print(f"latency : publish one file → replica in Rucio: p50 {statistics.median(lat) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms (batch window {settings.ingest.batch_window}s)")
    stop.set()
    thread.join(60)


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


if __name__ == "__main__":
    sys.exit(main())
