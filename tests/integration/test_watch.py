"""The buffer watcher on the real RabbitMQ: what the DAQ closes arrives on the DAQ exchange, exactly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from injector.config import Settings
from injector.events import FileClosed, decode_file_closed
from producers.watch import Options, run
from tests.integration.netfault import Proxy
from tests.integration.rabbit import AMQP_URL, declared, depth, get_all, unique_settings, wait_for

pytestmark = pytest.mark.integration

PATTERN = r"^(?P<night>[0-9]{8})/.*Run(?P<run>[0-9]+)"


def watch_settings(root: Path, **broker: Any) -> Settings:
    stream = {"name": "lst1-raw", "site": "ORM", "instrument": "LST1", "datatype": "raw", "source_rse": "ORM-BUFFER",
              "storage_root": str(root), "scope": "lst", "dataset": "LST1_{night}_raw", "path_fields": PATTERN,
              "rules": [{"rse_expression": "PIC-ARCHIVE"}]}
    return unique_settings({"streams": [stream]}, broker=broker, outbox={"path": str(root.parent / "outbox.sqlite")})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "buffer" / "20261124").mkdir(parents=True)
    return tmp_path / "buffer"


@contextmanager
def watching(settings: Settings, expect: int = 0, **options: Any) -> Iterator[list[int]]:
    """The watcher on a thread, until the block ends; then its exit code is in the yielded list, and must be
    `expect` (a watcher that raised or returned another code fails the test).

    A file written at once into a new directory is often closed before inotify watches the directory
    (always so on a loaded machine): it is then announced after found_quiet, shortened here."""
    stop, ready, code = threading.Event(), threading.Event(), []
    opts = Options(**{"window": 0.05, "found_quiet": 1.0, **options})
    thread = threading.Thread(target=lambda: code.append(run(settings, opts, stop, ready)), daemon=True)
    thread.start()
    assert ready.wait(10), "the watcher did not start"
    try:
        yield code
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the watcher did not stop"
    assert code == [expect], f"the watcher ended with {code or 'an exception'}, expected exit code {expect}"


def events(settings: Settings, times: int = 1) -> dict[str, FileClosed]:
    """Every event published, by path; each path must have been announced exactly `times` times (counted with
    multiplicity: a duplicate fails here)."""
    messages = get_all(settings, settings.ingest.queue)
    decoded = [decode_file_closed(m.body) for m in messages]
    assert all(m.delivery_info["routing_key"] == "file.closed.ORM.LST1" for m in messages)
    other = {p: n for p, n in Counter(e.path for e in decoded).items() if n != times}
    assert not other, f"announced other than {times} time(s): {other}"
    return {e.path: e for e in decoded}


def quiet(settings: Settings, seconds: float) -> None:
    """Wait until the queue's depth has not changed for `seconds` (longer than any wait of the watcher's, so
    a late duplicate would have been published)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < seconds:
        n = depth(settings, settings.ingest.queue)
        if n != last:
            last, since = n, time.monotonic()
        time.sleep(0.1)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def expect(path: Path, data: bytes, night: str | None = "20261124", run: int | None = None) -> dict[str, Any]:
    return {"site": "ORM", "instrument": "LST1", "datatype": "raw", "path": str(path), "size": len(data),
            "adler32": f"{zlib.adler32(data) & 0xFFFFFFFF:08x}", "night": night, "run": run}


def seen(e: FileClosed) -> dict[str, Any]:
    return {k: getattr(e, k) for k in ("site", "instrument", "datatype", "path", "size", "adler32", "night", "run")}


def test_closed_and_renamed_files_are_announced_with_their_fields_and_temporary_ones_never(root):
    s = watch_settings(root)
    night = root / "20261124"
    write(night / "LST-1.Run00041.fits", b"there before the watcher started")
    with declared(s):
        with watching(s) as code:
            direct = write(night / "LST-1.Run00042.fits", b"a" * 100_000)
            renamed = night / "LST-1.Run00043.fits"
            os.replace(write(night / "LST-1.Run00043.fits.tmp", b"b" * 5000), renamed)
            write(night / "LST-1.Run00044.fits.part", b"still being copied")
            write(night / ".LST-1.Run00045.fits.swp", b"an editor's")
            fresh = write(root / "20261125" / "LST-1.Run00046.fits", b"in a directory created a moment ago")
            moved_dir = root / "20261126.tmp"
            write(moved_dir / "LST-1.Run00047.fits", b"written in a temporary directory")
            os.rename(moved_dir, root / "20261126")
            wait_for(lambda: depth(s, s.ingest.queue) >= 4, timeout=10, what="4 file-closed events")
            quiet(s, 2.5)  # > found_quiet (1 s) + the poll: a second sighting would be announced by now
        got = events(s)  # the stop published everything pending: any extra event would be here
    assert code == [0]
    assert {p: seen(e) for p, e in got.items()} == {
        str(direct): expect(direct, b"a" * 100_000, run=42),
        str(renamed): expect(renamed, b"b" * 5000, run=43),
        str(fresh): expect(fresh, b"in a directory created a moment ago", night="20261125", run=46),
        str(root / "20261126" / "LST-1.Run00047.fits"): expect(
            root / "20261126" / "LST-1.Run00047.fits", b"written in a temporary directory", night="20261126", run=47),
    }


def test_existing_files_are_announced_at_start_with_existing(root):
    s = watch_settings(root)
    old = write(root / "20261124" / "LST-1.Run00007.fits", b"closed while the watcher was down")
    write(root / "20261124" / "LST-1.Run00008.fits.tmp", b"never finished")
    past = time.time() - 3600
    os.utime(old, (past, past))
    with declared(s):
        with watching(s, existing=True) as code:
            wait_for(lambda: depth(s, s.ingest.queue) >= 1, timeout=10, what="the existing file announced")
            quiet(s, 2.5)
        got = events(s)
    assert code == [0]
    assert [seen(e) for e in got.values()] == [expect(old, b"closed while the watcher was down", run=7)]


def test_a_path_the_pattern_does_not_match_is_announced_without_its_fields_and_a_warning(root, caplog):
    s = watch_settings(root)
    with declared(s):
        with watching(s), caplog.at_level(logging.WARNING, logger="producers.watch"):
            odd = write(root / "calibration" / "pedestal.fits", b"no night in this path")
            wait_for(lambda: depth(s, s.ingest.queue) >= 1, timeout=10, what="the unmatched file announced")
        got = events(s)
    assert [seen(e) for e in got.values()] == [expect(odd, b"no night in this path", night=None)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(odd) in w and PATTERN in w and "template-field-missing" in w for w in warnings), warnings


def test_events_pending_when_stopped_are_published_before_the_watcher_exits(root):
    s = watch_settings(root)
    with declared(s):
        with watching(s, window=60) as code:  # nothing would be published for a minute
            closed = write(root / "20261124" / "LST-1.Run00050.fits", b"closed just before the stop")
            time.sleep(0.5)
            assert depth(s, s.ingest.queue) == 0
        assert code == [0]
        assert [seen(e) for e in events(s).values()] == [expect(closed, b"closed just before the stop", run=50)]


def test_events_are_kept_while_the_broker_is_down_and_published_when_it_is_back(root, caplog):
    proxy = Proxy(("127.0.0.1", 1))  # nothing listens there: every connection is refused
    s = watch_settings(root, urls=[f"amqp://guest:guest@127.0.0.1:{proxy.port}//"])
    direct = s.model_copy(update={"broker": s.broker.model_copy(update={"urls": [AMQP_URL]})})  # for the test
    try:
        with declared(direct):
            with watching(s, retry_max_wait=0.3) as code, caplog.at_level(logging.WARNING, "producers.announcer"):
                closed = write(root / "20261124" / "LST-1.Run00060.fits", b"closed during a broker outage")
                wait_for(lambda: any("broker unavailable" in r.getMessage() for r in caplog.records), timeout=10,
                         what="a failed publish")
                assert depth(direct, s.ingest.queue) == 0
                proxy.upstream = ("127.0.0.1", 5672)
                wait_for(lambda: depth(direct, s.ingest.queue) == 1, timeout=10, what="the kept event published")
            assert code == [0]
            assert [seen(e) for e in events(direct).values()] == [
                expect(closed, b"closed during a broker outage", run=60)]
    finally:
        proxy.close()


def test_watch_verb_announces_existing_and_new_files_and_exits_cleanly_on_sigterm(root, tmp_path):
    s = watch_settings(root)
    old = write(root / "20261124" / "LST-1.Run00070.fits", b"already there")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    config = tmp_path / "injector.toml"
    config.write_text(f'[broker]\nurls = ["{AMQP_URL}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
                      f'[[streams]]\nname = "lst1-raw"\nsite = "ORM"\ninstrument = "LST1"\ndatatype = "raw"\n'
                      f'source_rse = "ORM-BUFFER"\nstorage_root = "{root}"\nscope = "lst"\n'
                      f'dataset = "LST1_{{night}}_raw"\npath_fields = \'{PATTERN}\'\n'
                      f'rules = [{{ rse_expression = "PIC-ARCHIVE" }}]\n')
    with declared(s):
        proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "--config", str(config), "watch", "--existing",
                                 "--settle", "0.2", "--ignore", "*.log"], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: depth(s, s.ingest.queue) >= 1, timeout=15, what="the existing file announced")
            new = write(root / "20261124" / "LST-1.Run00071.fits", b"closed while watching")
            write(root / "20261124" / "LST-1.Run00071.log", b"ignored by --ignore")
            wait_for(lambda: depth(s, s.ingest.queue) >= 2, timeout=10, what="the new file announced")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        got = events(s)
    assert proc.returncode == 0, err
    assert {p: seen(e) for p, e in got.items()} == {str(old): expect(old, b"already there", run=70),
                                                    str(new): expect(new, b"closed while watching", run=71)}
    assert "received SIGTERM" in err
    for e in got.values():
        assert f"announced {e.path} size={e.size} adler32={e.adler32} [event_id={e.event_id}]" in err


def test_a_stop_while_the_broker_stays_down_exits_1_naming_every_file_not_announced(root, caplog):
    proxy = Proxy(("127.0.0.1", 1))  # nothing listens there: every connection is refused
    s = watch_settings(root, urls=[f"amqp://guest:guest@127.0.0.1:{proxy.port}//"])
    try:
        # A long window: the only publish attempts are those of the shutdown, whatever the timing.
        with watching(s, expect=1, window=60, retry_max_wait=0.1, shutdown_timeout=0.6) as code, \
                caplog.at_level(logging.INFO):
            closed = write(root / "20261124" / "LST-1.Run00080.fits", b"closed, never confirmed")
            time.sleep(0.2)
    finally:
        proxy.close()
    assert code == [1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "producers.edge"]
    assert errors == [f"{closed} not announced yet: broker unavailable at shutdown; kept in the outbox, the next "
                      "`watch` or `publish --flush` sends it"]
    assert not any(r.getMessage().startswith("announced") for r in caplog.records)
