"""The DAQ outbox on the real RabbitMQ: a broker that is down never loses an event, nor does kill -9 of the
publishing process (library, `publish`, `watch`); every event arrives once by event_id when the broker is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from injector.config import Settings
from injector.events import FileClosed, decode_file_closed
from injector.testbed.rucio import free_port
from producers.outbox import depth_of
from producers.publish import DaqPublisher
from tests.conftest import STREAMS
from tests.integration import cli
from tests.integration.netfault import Proxy
from tests.integration.rabbit import AMQP_URL, declared, depth, get_all, unique_settings, wait_for
from tests.integration.test_watch import PATTERN, quiet, write

pytestmark = pytest.mark.integration


def ev(n: int) -> FileClosed:
    return FileClosed.create(site="ORM", instrument="LST1", path=f"/data/lst1/run{n:05d}.fits.fz", size=n,
                             adler32=f"{n:08x}", night="20261124")


def via(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"broker": settings.broker.model_copy(update={"urls": [url]})})


def delivered(settings: Settings) -> Counter[str]:
    """event_id → how many times it is in the ingest queue (taken off it)."""
    return Counter(str(decode_file_closed(m.body).event_id) for m in get_all(settings, settings.ingest.queue))


def config(settings: Settings, path: Path, url: str, root: Path | None = None) -> Path:
    b = settings.broker
    text = (f'[broker]\nurls = ["{url}"]\ndaq_exchange = "{b.daq_exchange}"\n'
            f'dead_letter_exchange = "{b.dead_letter_exchange}"\nconnect_attempts = 1\n'
            f'[ingest]\nqueue = "{settings.ingest.queue}"\n[cleanup]\nqueue = "{settings.cleanup.queue}"\n'
            f'hermes_destination = "{settings.cleanup.hermes_destination}"\n'
            f'[outbox]\npath = "{settings.outbox.path}"\n')
    if root is not None:
        text += (f'[[streams]]\nname = "lst1-raw"\nsite = "ORM"\ninstrument = "LST1"\ndatatype = "raw"\n'
                 f'source_rse = "ORM-BUFFER"\nstorage_root = "{root}"\nscope = "lst"\n'
                 f'dataset = "LST1_{{night}}_raw"\npath_fields = \'{PATTERN}\'\n'
                 f'rules = [{{ rse_expression = "PIC-ARCHIVE" }}]\n')
    path.write_text(text)
    return path


@pytest.fixture
def proxy():
    p = Proxy(("127.0.0.1", 1))  # nothing listens there: every connection is refused until upstream is fixed
    yield p
    p.close()


@pytest.fixture
def s(tmp_path: Path) -> Any:
    with declared(unique_settings(STREAMS, outbox={"path": str(tmp_path / "outbox.sqlite")})) as settings:
        yield settings


def test_a_thousand_publishes_with_the_broker_unreachable_return_at_once_and_all_arrive_once_when_it_is_back(
        s, proxy):
    down = via(s, f"amqp://guest:guest@127.0.0.1:{proxy.port}//")
    events = [ev(i) for i in range(1000)]
    with DaqPublisher(down.broker, outbox=s.outbox, max_wait=0.5) as daq:
        started = time.monotonic()
        for e in events:
            daq.publish([e])
        took = time.monotonic() - started
        print(f"\n1000 publish calls with the broker unreachable: {took:.2f} s")
        assert took < 10, f"publish waited for the broker: {took:.1f} s for 1000 calls"
        assert depth(s, s.ingest.queue) == 0 and daq.depth() == 1000
        proxy.upstream = ("127.0.0.1", 5672)
        wait_for(lambda: depth(s, s.ingest.queue) == 1000, timeout=60, what="the 1000 kept events published")
    quiet(s, 2.0)
    got = delivered(s)
    assert got == Counter({str(e.event_id): 1 for e in events})
    assert depth_of(s.outbox) == 0


CHILD = textwrap.dedent("""
    import sys, time
    from injector.config import parse
    from injector.events import FileClosed
    from producers.publish import DaqPublisher
    settings = parse({"broker": {"urls": [sys.argv[1]], "daq_exchange": sys.argv[2]}, "outbox": {"path": sys.argv[3]}})
    daq = DaqPublisher(settings.broker, outbox=settings.outbox, max_wait=0.2)
    for n in range(50):
        daq.publish([FileClosed.create(site="ORM", instrument="LST1", path=f"/data/lst1/k{n}.fits", size=n,
                                       adler32="00000001")])
        print(n, flush=True)
    time.sleep(600)
""")


def test_kill_9_of_a_library_publisher_with_events_in_the_outbox_loses_none_publish_flush_sends_them(
        s, proxy, tmp_path):
    down = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
    child = subprocess.Popen([sys.executable, "-c", CHILD, down, s.broker.daq_exchange, s.outbox.path],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline() for _ in range(50)]
        assert lines[-1].strip() == "49", lines
        time.sleep(0.5)  # its drainer retrying against the refusing broker
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert depth_of(s.outbox) == 50 and depth(s, s.ingest.queue) == 0
    out = cli.run("publish", "--flush", config=config(s, tmp_path / "c.toml", AMQP_URL))
    assert "outbox empty: 50 event(s) sent" in out.stdout
    got = delivered(s)
    assert len(got) == 50 and set(got.values()) == {1}
    assert depth_of(s.outbox) == 0


def test_publish_with_the_broker_down_keeps_the_event_and_exits_3_saying_how_many_wait(s, tmp_path):
    data = tmp_path / "run1.fits"
    data.write_bytes(b"closed during an outage")
    closed = config(s, tmp_path / "down.toml", f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    out = cli.run("publish", str(data), "--site", "ORM", "--instrument", "LST1", config=closed, expect=3)
    (line,) = out.stderr.splitlines()
    assert "unreachable" in line and f"1 event(s) wait in the outbox {s.outbox.path}" in line
    assert "publish --flush" in line
    cli.run("publish", "--flush", config=closed, expect=3)  # still down: still waiting, still exit 3
    assert depth_of(s.outbox) == 1
    out = cli.run("publish", "--flush", config=config(s, tmp_path / "up.toml", AMQP_URL))
    assert "outbox empty: 1 event(s) sent" in out.stdout
    (m,) = get_all(s, s.ingest.queue)
    assert decode_file_closed(m.body).path == str(data)


def test_a_watcher_killed_with_its_event_in_the_outbox_is_followed_by_one_that_sends_it_without_existing(
        s, proxy, tmp_path):
    root = tmp_path / "buffer"
    (root / "20261124").mkdir(parents=True)
    down = config(s, tmp_path / "down.toml", f"amqp://guest:guest@127.0.0.1:{proxy.port}//", root)
    port = free_port()
    with cli.service("watch", "--metrics-port", str(port), config=down, expect=-signal.SIGKILL) as first:
        wait_for(lambda: "watching stream" in first.err(), timeout=20, what="the watcher started")
        closed = write(root / "20261124" / "LST-1.Run00090.fits", b"closed while the broker is down")
        wait_for(lambda: depth_of(s.outbox) == 1, timeout=20, what="the event in the outbox")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "rucio_injector_outbox_events 1.0" in metrics
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    assert depth(s, s.ingest.queue) == 0
    up = config(s, tmp_path / "up.toml", AMQP_URL, root)
    with cli.service("watch", config=up):  # no --existing
        wait_for(lambda: depth(s, s.ingest.queue) == 1, timeout=30, what="the kept event published")
        quiet(s, 2.0)
    (m,) = get_all(s, s.ingest.queue)
    assert decode_file_closed(m.body).path == str(closed)
    assert depth_of(s.outbox) == 0


def test_an_unroutable_event_stays_in_the_outbox_is_reported_and_publish_flush_exits_3(s, tmp_path, caplog):
    nowhere = s.broker.model_copy(update={"daq_exchange": s.broker.dead_letter_exchange})  # no binding for it
    e = ev(1)
    with DaqPublisher(nowhere, outbox=s.outbox, background=False, close_timeout=0) as daq:
        daq.publish([e])
        done = daq.flush(0)
        assert (done.sent, done.left) == (0, 1) and "unroutable" in next(iter(done.parked.values()))
    assert any(str(e.event_id) in r.getMessage() and "NOT accepted" in r.getMessage() for r in caplog.records)
    cfg = config(s, tmp_path / "c.toml", AMQP_URL)
    cfg.write_text(cfg.read_text().replace(f'daq_exchange = "{s.broker.daq_exchange}"',
                                           f'daq_exchange = "{s.broker.dead_letter_exchange}"'))
    out = cli.run("publish", "--flush", config=cfg, expect=3)
    assert "unroutable" in out.stderr and "1 event(s) wait in the outbox" in out.stderr
    assert depth_of(s.outbox) == 1
