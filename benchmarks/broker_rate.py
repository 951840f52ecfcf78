"""Benchmark: AMQP transport rate on the local RabbitMQ (plain, and over TLS) and on the demo's embedded broker.

    .venv/bin/python benchmarks/broker_rate.py [--messages 20000] [--broker all|rabbitmq|tls|embedded]

`tls`: the machine's RabbitMQ TLS listener (5671, `make setup`) with a client certificate of its CA.

With the project's own Publisher (batches of 500, mandatory, publisher confirms awaited per batch)
and a plain prefetching consumer acking each message, on a throw-away topology. Prints messages/s
for publish+confirm and for consume+ack. Nothing here is asserted; it prints figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

from injector import topology
from injector.config import parse
from injector.messages import Outgoing
from injector.testbed.broker import embedded
from injector.testbed.tls import AMQPS_PORT, machine_authority
from injector.transport.amqp import Publisher, connection

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
RABBITMQ_TLS = f"amqps://guest:guest@localhost:{AMQPS_PORT}//"
BATCH = 500


def measure(url: str, n: int, size: int, tls: dict[str, str] | None = None) -> tuple[float, float]:
    tag = uuid.uuid4().hex[:8]
    s = parse({"broker": {"urls": [url], "daq_exchange": f"bench-{tag}.daq",
                          "dead_letter_exchange": f"bench-{tag}.dlx", **({"tls": tls} if tls else {})},
               "ingest": {"queue": f"bench-{tag}.ingest"}, "cleanup": {"queue": f"bench-{tag}.cleanup"}},
              source="<benchmark>")
    conn = connection(s.broker)
    decl = topology.declare(s)
    topology.apply(conn, decl)
    try:
        publisher, body = Publisher(conn), b"x" * size
        started = time.monotonic()
        for i in range(0, n, BATCH):
            publisher.publish([Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", body, {}, f"m{i + j}")
                               for j in range(min(BATCH, n - i))])
        publish_rate = n / (time.monotonic() - started)
        channel = conn.channel()
        channel.basic_qos(0, 2000, False)
        got = 0

        def on_message(message: object) -> None:
            nonlocal got
            got += 1
            channel.basic_ack(message.delivery_tag)  # type: ignore[attr-defined]

        started = time.monotonic()
        channel.basic_consume(s.ingest.queue, callback=on_message)
        while got < n:
            conn.drain_events(timeout=10)
        return publish_rate, n / (time.monotonic() - started)
    finally:
        topology.remove(conn, decl)
        conn.release()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--size", type=int, default=400, help="body bytes (a file-closed event is ≈ 400)")
    p.add_argument("--broker", choices=("all", "rabbitmq", "tls", "embedded"), default="all")
    args = p.parse_args()
    print(f"{args.messages} messages of {args.size} bytes")
    if args.broker in ("all", "rabbitmq"):
        pub, con = measure(RABBITMQ, args.messages, args.size)
        print(f"RabbitMQ {RABBITMQ}: publish+confirm {pub:,.0f}/s, consume+ack {con:,.0f}/s")
    if args.broker in ("all", "tls"):
        with tempfile.TemporaryDirectory() as d:
            client = machine_authority().issue(Path(d), "benchmark", client=True)
            tls = {"ca_file": str(machine_authority().cert), "cert_file": str(client.cert),
                   "key_file": str(client.key)}
            pub, con = measure(RABBITMQ_TLS, args.messages, args.size, tls)
        print(f"RabbitMQ {RABBITMQ_TLS} (TLS, client certificate): publish+confirm {pub:,.0f}/s, "
              f"consume+ack {con:,.0f}/s")
    if args.broker in ("all", "embedded"):
        with embedded() as eb:
            pub, con = measure(eb.amqp_url, args.messages, args.size)
        print(f"embedded broker {eb.amqp_url}: publish+confirm {pub:,.0f}/s, consume+ack {con:,.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
