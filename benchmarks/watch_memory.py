"""Benchmark: `rucio-injector watch` reading a big file: its peak RSS, and how long a small file closed meanwhile
waits for its announcement.

    .venv/bin/python benchmarks/watch_memory.py [--gib 4] [--hash-workers N] [--dir /tmp/watch-bench]

Writes one big file (real bytes, kept in --dir for the next run) into a throw-away stream root, starts
`rucio-injector watch --existing` as a child process on the local RabbitMQ, closes a small file 1 s later, and
stops the child once both are announced. Prints the child's peak RSS (from wait4) and the times.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import kombu

from injector import topology
from injector.config import Settings, parse
from injector.events import decode_file_closed

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
BLOCK = 4 * 1024 * 1024


def big_file(directory: Path, gib: int) -> Path:
    path = directory / "20261124" / f"big-{gib}GiB.fits"
    if not path.exists() or path.stat().st_size != gib * 1024**3:
        path.parent.mkdir(parents=True, exist_ok=True)
        block = os.urandom(BLOCK)
        with open(path, "wb") as fh:
            for _ in range(gib * 1024**3 // BLOCK):
                fh.write(block)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def config(directory: Path, tag: str) -> tuple[Settings, Path]:
    text = (f'[broker]\nurls = ["{RABBITMQ}"]\ndaq_exchange = "bench-{tag}.daq"\n'
            f'dead_letter_exchange = "bench-{tag}.dlx"\n[ingest]\nqueue = "bench-{tag}.ingest"\n'
            f'[cleanup]\nqueue = "bench-{tag}.cleanup"\n'
            f'[[streams]]\nname = "bench"\nsite = "ORM"\ninstrument = "LST1"\nsource_rse = "ORM-BUFFER"\n'
            f'storage_root = "{directory}"\nscope = "lst"\ndataset = "LST1_bench"\n'
            f'rules = [{{ rse_expression = "PIC-ARCHIVE" }}]\n')
    path = directory.parent / f"bench-{tag}.toml"
    path.write_text(text)
    import tomllib

    return parse(tomllib.loads(text), source=str(path)), path


def arrivals(conn: kombu.Connection, queue: str, n: int) -> dict[str, float]:
    """When each of the first n file-closed events arrived (monotonic), by path."""
    channel, out = conn.channel(), {}
    while len(out) < n:
        message = channel.basic_get(queue)
        if message is None:
            time.sleep(0.01)
            continue
        out[decode_file_closed(message.body).path] = time.monotonic()
        channel.basic_ack(message.delivery_tag)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--hash-workers", type=int, help="passed to watch (default: watch's own)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/watch-bench"))
    args = ap.parse_args()
    root = args.dir / "root"
    big = big_file(root, args.gib)
    for old in root.glob("20261124/small-*"):
        old.unlink()
    settings, cfg = config(root, uuid.uuid4().hex[:8])
    decl = topology.declare(settings)
    cmd = [sys.executable, "-m", "injector.cli", "--config", str(cfg), "--log-level", "WARNING", "watch", "--existing"]
    if args.hash_workers:
        cmd += ["--hash-workers", str(args.hash_workers)]
    with kombu.Connection(RABBITMQ) as conn:
        topology.apply(conn, decl)
        try:
            child = subprocess.Popen(cmd)
            started = time.monotonic()
            time.sleep(1.0)  # watch is up and reading the big file
            small = root / "20261124" / "small-1.fits"
            small.write_bytes(b"closed while the big file is read")
            closed = time.monotonic()
            seen = arrivals(conn, settings.ingest.queue, 2)
            child.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            topology.remove(conn, decl)
            cfg.unlink()
    print(f"{big.name}: announced {seen[str(big)] - started:.2f} s after the start; a small file closed 1 s after "
          f"the start announced {seen[str(small)] - closed:.2f} s after its close; watch peak RSS "
          f"{usage.ru_maxrss / 1024:.1f} MiB (exit status {status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
