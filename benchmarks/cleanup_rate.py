"""Benchmark: hermes events/s the cleanup consumer's link consumes and acks.

    .venv/bin/python benchmarks/cleanup_rate.py [--events 20000] [--broker both|rabbitmq|activemq]

On the local RabbitMQ (hermes publishes over its STOMP plugin, 127.0.0.1:61613, to a throw-away bench-<tag>
topology declared with `topology.apply` and deleted at the end; the cleanup consumer reads its quorum queue
over AMQP, as `rucio-injector cleanup` does there) and on a throw-away ActiveMQ Classic running
broker-config/activemq/activemq.xml (started here, stopped at the end). The events, hermes-style
transfer-done messages (persistent, header event_type), are pre-loaded first with receipts to the
hermes destination: RabbitMQ /topic/<topic> (→ amq.topic → the cleanup queue), ActiveMQ the virtual
topic (its Consumer.<app>.VirtualTopic.<name> queue is created first, so nothing is dropped). Then ONE
cleanup consumer, the project's own link + BatchWorker (`consumers.services.cleanup_link`: AMQP on RabbitMQ,
STOMP on ActiveMQ; the [cleanup] defaults for batch size, window and prefetch), takes them with a
`process` that calls no Rucio and acks every event: the figure is the transport + batching loop + acks
only, the ceiling for cleanup. Prints per broker: events, seconds (from starting the consumer to the last ack
sent), events/s, batches, and what the broker still holds afterwards (0: every ack arrived). Nothing here is
asserted; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import kombu
import stomp

from consumers.services import cleanup_link
from injector import topology
from injector.config import Cleanup, Settings, parse
from injector.messages import Delivery, Outgoing
from injector.settle import Outcome, Route
from injector.testbed.activemq import JAR, start_activemq
from injector.transport.stomp import Receipts
from injector.worker import Batching, BatchWorker

RABBITMQ_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
RABBITMQ_STOMP = "127.0.0.1:61613"
PRELOAD_CHUNK = 1000  # events sent per round of receipts
STALL = 60.0  # seconds without progress before the benchmark gives up


def hermes_transfer_done(i: int) -> bytes:
    """One transfer-done as Rucio's hermes sends it (the conveyor's payload fields)."""
    name = f"/fefs/onsite/data/lst1/20261125/LST-1.1.Run{i:06d}.0000.fits.fz"
    transfer = uuid.uuid4()
    payload = {
        "activity": "T0 Export", "request-id": uuid.uuid4().hex, "duration": 41.2, "checksum-adler": f"{i:08x}",
        "checksum-md5": None, "file-size": 1073741824, "bytes": 1073741824, "guid": None,
        "previous-request-id": None, "protocol": "root", "scope": "lst", "name": name,
        "dataset": "LST1_20261125_raw", "datasetScope": "lst", "src-type": "DISK", "src-rse": "ORM-LST-BUFFER",
        "src-url": f"root://buffer.orm:1094/{name}", "dst-type": "TAPE", "dst-rse": "PIC-ARCHIVE",
        "dst-url": f"root://archive.pic.es:1094/lst/{i % 256:02x}/{i // 256 % 256:02x}/{name.rsplit('/', 1)[1]}",
        "reason": "", "transfer-endpoint": "https://fts.pic.es:8446", "transfer-id": str(transfer),
        "transfer-link": f"https://fts.pic.es:8449/fts3/ftsmon/#/job/{transfer}",
        "created_at": "2026-11-25 01:00:00.000000", "submitted_at": "2026-11-25 01:00:01.000000",
        "started_at": "2026-11-25 01:00:02.000000", "transferred_at": "2026-11-25 01:00:43.000000",
        "tool-id": "rucio-conveyor", "account": "root", "auth_method": None, "vo": "def",
    }
    return json.dumps({"event_type": "transfer-done", "payload": payload,
                       "created_at": "2026-11-25 01:00:44.000000"}).encode()


def ack_all(batch: list[Delivery]) -> Sequence[Outcome]:
    """The cleanup handler's place, without Rucio: every delivery is done, so settle acks it."""
    return [Outcome.done("bench")] * len(batch)


def stomp_connection(c: Cleanup) -> Any:
    return stomp.Connection12(c.stomp_addresses[:1], vhost=c.vhost, auto_decode=False, timeout=10)


def preload(c: Cleanup, bodies: list[bytes]) -> None:
    """Send every event to the hermes destination; returns once the broker receipted all of them."""
    conn = stomp_connection(c)
    receipts = Receipts()
    conn.set_listener("receipts", receipts)
    conn.connect(c.username, c.password, wait=True)
    try:
        if c.flavour == "activemq":
            # A virtual topic forwards only to Consumer.* queues that exist: subscribing creates ours
            # (it stays after UNSUBSCRIBE); frames of one connection are handled in order.
            conn.subscribe(c.subscription, id="create", ack="client-individual")
            conn.unsubscribe(id="create")
        for i in range(0, len(bodies), PRELOAD_CHUNK):
            receipts.send(conn, c.hermes_destination,
                          [Outgoing(c.hermes_destination, "", b, {"event_type": "transfer-done"})
                           for b in bodies[i:i + PRELOAD_CHUNK]])
    finally:
        conn.disconnect()


class _Count(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.messages = 0

    def on_message(self, frame: Any) -> None:
        self.messages += 1


def left_on_broker(c: Cleanup, wait: float = 2.0) -> int:
    """Messages the consumer queue still delivers (none acked: they stay); 0 when every ack arrived."""
    conn = stomp_connection(c)
    count = _Count()
    conn.set_listener("count", count)
    conn.connect(c.username, c.password, wait=True)
    try:
        conn.subscribe(c.subscription, id="check", ack="client-individual")
        time.sleep(wait)
    finally:
        conn.disconnect()
    return count.messages


def measure(settings: Settings, bodies: list[bytes]) -> dict[str, float]:
    c, n = settings.cleanup, len(bodies)
    started = time.perf_counter()
    preload(c, bodies)
    preloaded = time.perf_counter() - started

    route = Route(c.consumer_queue, settings.broker.dead_letter_exchange, settings.broker.delivery_limit)
    worker = BatchWorker(cleanup_link(settings), route, ack_all, Batching(c.batch_size, c.batch_window, c.prefetch))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="cleanup-bench", daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        seen, moved = 0, time.monotonic()
        while (done := worker.stats.messages) < n:
            if done != seen:
                seen, moved = done, time.monotonic()
            elif time.monotonic() - moved > STALL or not thread.is_alive():
                raise RuntimeError(f"consumer stalled: {done} of {n} events acked, "
                                   f"{worker.stats.reconnects} reconnects")
            time.sleep(0.005)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        thread.join(30)
    return {"events": worker.stats.messages, "seconds": seconds, "rate": worker.stats.messages / seconds,
            "batches": worker.stats.batches, "preload": preloaded, "left": left_on_broker(c)}


def on_rabbitmq(bodies: list[bytes]) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    settings = parse({
        "broker": {"urls": [RABBITMQ_AMQP], "daq_exchange": f"bench-{tag}.daq",
                   "dead_letter_exchange": f"bench-{tag}.dlx"},
        "ingest": {"queue": f"bench-{tag}.ingest"},
        "cleanup": {"stomp_hosts": [RABBITMQ_STOMP], "queue": f"bench-{tag}.cleanup",
                    "hermes_destination": f"/topic/bench-{tag}.rucio.events"},
    }, source="<benchmark>")
    decl = topology.declare(settings)
    try:
        with kombu.Connection(RABBITMQ_AMQP) as conn:
            topology.apply(conn, decl)
        return measure(settings, bodies)
    finally:  # also after a half-done apply: deleting what does not exist is fine
        with kombu.Connection(RABBITMQ_AMQP) as conn:
            topology.remove(conn, decl)


def on_activemq(bodies: list[bytes]) -> dict[str, float]:
    if not JAR.exists():
        raise SystemExit(f"{JAR} is missing: install the Debian package `activemq` (bash .ci/setup-machine)")
    tag = uuid.uuid4().hex[:8]
    # start_activemq stops java itself when interrupted mid-start; `with` stops it on any later exit.
    with tempfile.TemporaryDirectory(prefix="cleanup-bench-") as tmp, start_activemq(Path(tmp)) as amq:
        settings = parse({"cleanup": {"flavour": "activemq", "stomp_hosts": [amq.stomp_host], "app": f"bench-{tag}",
                                      "hermes_destination": f"/topic/VirtualTopic.bench-{tag}.rucio.events"}},
                         source="<benchmark>")
        return measure(settings, bodies)


def report(broker: str, r: dict[str, float]) -> None:
    print(f"{broker}: events {r['events']:.0f}, seconds {r['seconds']:.2f}, events/s {r['rate']:,.0f}, "
          f"batches {r['batches']:.0f}  (pre-load {r['preload']:.2f}s = {r['events'] / r['preload']:,.0f}/s "
          f"receipted; left on the broker afterwards: {r['left']:.0f})", flush=True)


def _terminate(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: queues deleted, ActiveMQ stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--broker", choices=("both", "rabbitmq", "activemq"), default="both")
    args = ap.parse_args(argv)
    if args.events < 1:
        ap.error("--events must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)

    bodies = [hermes_transfer_done(i) for i in range(args.events)]
    c = Cleanup()
    print(f"{args.events} hermes transfer-done events of ~{sum(map(len, bodies)) // len(bodies)} bytes; one cleanup "
          f"consumer, batch {c.batch_size} / window {c.batch_window}s / prefetch {c.prefetch}, no Rucio calls",
          flush=True)
    try:
        if args.broker in ("both", "rabbitmq"):
            report("RabbitMQ (hermes over STOMP, cleanup over AMQP)", on_rabbitmq(bodies))
        if args.broker in ("both", "activemq"):
            report("ActiveMQ Classic (throw-away)", on_activemq(bodies))
    except KeyboardInterrupt:  # everything made here is already deleted or stopped by now
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
