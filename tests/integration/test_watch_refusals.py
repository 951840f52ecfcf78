"""Hostile file names at the DAQ edge, on the real RabbitMQ (and the real Rucio server for what it refuses):
a bad name is recorded once in the ingest DLQ and skipped, and the rest of the tree keeps flowing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from injector import topology
from injector.config import Settings, parse
from producers.refusals import refusal
from tests.integration.rabbit import declared, depth, get_all, wait_for
from tests.integration.test_dlq import write_config
from tests.integration.test_watch import events, watch_settings, watching

pytestmark = pytest.mark.integration

OLD = time.time() - 3600  # files closed while the watcher was down: --existing announces them at once


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "buffer" / "20261124").mkdir(parents=True)
    return tmp_path / "buffer"


def write_raw(directory: Path, name: bytes, data: bytes) -> bytes:
    """A file whose name is any bytes (not necessarily UTF-8); its full path as bytes."""
    path = os.path.join(os.fsencode(directory), name)
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, (OLD, OLD))
    return path


def dlq(s: Settings) -> str:
    return topology.dead_letter_queue(s.ingest.queue)


def records(s: Settings) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(json.loads(m.body), dict(m.headers)) for m in get_all(s, dlq(s))]


def watch_existing_until(s: Settings, announced: int, recorded: int) -> None:
    with watching(s, existing=True) as code:
        wait_for(lambda: depth(s, s.ingest.queue) >= announced and depth(s, dlq(s)) >= recorded, timeout=20,
                 what=f"{announced} announced, {recorded} recorded")
        time.sleep(0.5)  # anything extra would arrive now
    assert code == [0]


def test_a_name_that_is_not_utf8_is_recorded_once_across_restarts_and_the_rest_of_its_batch_is_announced(
        root, tmp_path):
    s = watch_settings(root)
    night = root / "20261124"
    good = [write_raw(night, f"LST-1.Run0009{n}.fits".encode(), b"good %d" % n) for n in range(3)]
    bad = write_raw(night, b"LST-1.Run00099\xff\xfe.fits", b"a name no JSON can carry")
    with declared(s):
        watch_existing_until(s, announced=3, recorded=1)
        watch_existing_until(s, announced=6, recorded=1)  # a restart: the same files again
        cfg = write_config(s, tmp_path / "c.toml")
        listed = subprocess.run([sys.executable, "-m", "injector.cli", "--config", str(cfg), "dlq", "list", "--json",
                                 "--reason", "bad-file-name"], capture_output=True, text=True, timeout=60)
        got, recorded = events(s, times=2), records(s)  # each good file once per --existing run
    assert listed.returncode == 0, listed.stderr
    assert [m["reason"] for m in json.loads(listed.stdout)["messages"]] == ["bad-file-name"]
    assert sorted(got) == sorted(os.fsdecode(p) for p in good)
    [(body, headers)] = recorded
    assert headers["dlq-reason"] == "bad-file-name" and "not valid UTF-8" in headers["dlq-error"]
    assert body["path"] == str(night) + "/LST-1.Run00099\\xff\\xfe.fits"
    assert base64.b64decode(body["path_base64"]) == bad
    assert (body["field"], body["reason"], body["stream"]) == ("path", "bad-file-name", "lst1-raw")
    assert "byte 0xff" in body["error"]


def test_names_rucio_refuses_are_recorded_with_its_reason_and_never_announced(root):
    s = watch_settings(root)
    night = root / "20261124"
    names = ["LST-1.Run00101 space.fits", "LST-1.Run00102_é.fits", "LST-1.Run00103\n.fits",
             "LST-1.Run00104_" + "x" * (250 - len(str(night)) - 20) + ".fits"]  # the DID name (the path) > 250
    with declared(s):
        with watching(s) as code:
            for data in (b"refused by name", b"written again"):  # closed twice: still one record each
                for name in names:
                    write_raw(night, name.encode(), data)
            ok = write_raw(night, b"-LST-1..Run00105.fits", b"odd but a valid Rucio name")
            wait_for(lambda: depth(s, dlq(s)) >= 4, timeout=20, what="4 recorded")
            wait_for(lambda: depth(s, s.ingest.queue) >= 1, timeout=20, what="the valid odd name announced")
            time.sleep(0.5)
        assert code == [0]
        got, recorded = events(s), records(s)
    assert list(got) == [os.fsdecode(ok)]
    assert sorted(base64.b64decode(b["path_base64"]).decode() for b, _ in recorded) == sorted(
        str(night / n) for n in names)
    assert {h["dlq-reason"] for _, h in recorded} == {"invalid-name"}
    assert all("not a valid Rucio name" in b["error"] and b["field"] == "path" for b, _ in recorded)


def test_the_watcher_refuses_exactly_the_names_the_real_rucio_server_refuses(lab):
    stream = parse({"streams": [lab.stream(did_name="relative", did_prefix="/lst/")]}).streams[0]
    tail = uuid.uuid4().hex[:8]
    names = [f"run-{tail}.fits", f"-lead-{tail}", f"a..b-{tail}", f"sub/x_{tail}.fz", f"sp ace-{tail}",
             f"uni-é-{tail}", f"nl-{tail}\n", f"tab\t{tail}", f"semi;{tail}", "L" * (250 - 5) + tail[:1],
             "L" * (250 - 5 - 1) + tail[:1]]
    for name in names:
        edge_refuses = refusal(stream, f"{lab.root}/{name}") is not None
        try:
            lab.client.add_did("lst", f"/lst/{name}", "DATASET")
            rucio_refuses = False
        except Exception:  # InvalidObject by the schema; a newline does not even route (404)
            rucio_refuses = True
        assert edge_refuses == rucio_refuses, (name, edge_refuses, rucio_refuses)
