"""The watcher's refusals by name and its hashing pool, without a broker."""

from __future__ import annotations

import base64
import json
import os
import threading
import time

import pytest

from injector.config import Stream, parse
from producers.candidates import Candidate
from producers.hashing import HashPool
from producers.refusals import message, refusal
from producers.watch import announcement
from tests.conftest import STREAMS


def stream(**over: object) -> Stream:
    return parse({"streams": [{**STREAMS["streams"][0], **over}]}).streams[0]


def test_a_path_that_is_not_utf8_is_refused_as_a_bad_file_name_naming_the_byte():
    r = refusal(stream(), os.fsdecode(b"/data/lst1/20261124/Run1\xff.fits"))
    assert r is not None and (r.reason, r.field) == ("bad-file-name", "path")
    assert "byte 0xff at byte 24" in r.error and r.shown == "/data/lst1/20261124/Run1\\xff.fits"


@pytest.mark.parametrize("name", ["Run 1.fits", "Run_é.fits", "Run1.fits\n", "Run\t1", "x" * 240])
def test_a_name_rucio_refuses_is_refused_with_ingests_reason(name):
    r = refusal(stream(), f"/data/lst1/{name}")
    assert r is not None and r.reason == "invalid-name" and "did_name 'path'" in r.error


@pytest.mark.parametrize("name", ["-Run1.fits", "a..b", "sub/Run_1-2.fits.fz"])
def test_odd_but_valid_names_are_not_refused(name):
    assert refusal(stream(), f"/data/lst1/{name}") is None


def test_the_did_name_decides_so_a_long_path_is_fine_when_only_its_basename_is_the_name():
    long_dir = "/data/lst1/" + "d" * 240
    assert refusal(stream(), f"{long_dir}/Run1.fits") is not None
    assert refusal(stream(did_name="basename"), f"{long_dir}/Run1.fits") is None


def test_the_record_of_a_refusal_has_a_stable_id_and_the_exact_path_bytes():
    raw = b"/data/lst1/Run1\xfe\n.fits"
    r = refusal(stream(), os.fsdecode(raw))
    assert r is not None and r.id == refusal(stream(), os.fsdecode(raw)).id  # type: ignore[union-attr]
    m = message(r, "ingest", "ingest.dlq")
    body = json.loads(m.body)
    assert base64.b64decode(body["path_base64"]) == raw and body["path"] == "/data/lst1/Run1\\xfe\\n.fits"
    assert (m.exchange, m.routing_key, m.message_id, m.headers["dlq-reason"]) == ("", "ingest.dlq", r.id,
                                                                                    "bad-file-name")


def test_the_pool_reads_at_most_its_workers_at_once_and_keeps_the_rest_waiting():
    started, release, running, most = threading.Semaphore(0), threading.Event(), [0], [0]
    lock = threading.Lock()

    def read(c: Candidate, cancelled: object) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started.release()
        release.wait(5)
        with lock:
            running[0] -= 1

    pool = HashPool(2, read)
    pool.add(Candidate(stream(), f"/data/lst1/Run{n}", 0.0) for n in range(5))
    pool.pump()
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    assert len(pool.waiting()) == 5 and most[0] == 2
    release.set()
    while pool.busy():
        pool.wait(1)
        pool.done()
        pool.pump()
    assert most[0] == 2
    pool.close()


def test_a_close_stops_a_long_read_at_its_next_chunk_and_keeps_the_file_as_unfinished(tmp_path):
    big = tmp_path / "Run1.fits"
    with open(big, "wb") as fh:
        fh.truncate(64 * 1024**3)  # sparse: 64 GiB of zeros take minutes to read, no disk
    pool = HashPool(1, announcement)
    c = Candidate(stream(storage_root=str(tmp_path)), str(big), 0.0)
    pool.add([c])
    pool.pump()
    time.sleep(0.2)
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 5 and pool.unfinished == [c] and not pool.busy()


def test_a_read_that_completes_while_the_pool_closes_is_returned_not_lost():
    def read(c: Candidate, cancelled: object) -> str:
        time.sleep(0.3)  # its last chunk: it never looks at `cancelled` again
        return c.path

    pool = HashPool(1, read)  # type: ignore[arg-type]
    pool.add([Candidate(stream(), "/data/lst1/Run7", 0.0)])
    pool.pump()
    assert pool.close() == ["/data/lst1/Run7"] and not pool.busy()
