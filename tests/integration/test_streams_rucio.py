"""One file, one DID, on the real RabbitMQ and a real Rucio server: symlinks, overlapping roots, watch's start check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consumers.services import ingest_worker
from injector import deadletter, exits, topology
from injector.config import Settings
from injector.events import FileClosed
from injector.transport.amqp import Publisher, connection
from producers.publish import DaqPublisher, file_closed, outgoing
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import declared, get_all, running, unique_settings, wait_for
from tests.integration.test_ingest_rucio import write_config

pytestmark = pytest.mark.integration

NIGHT = "20261129"


def settings_with_root(lab: Lab, root: Path) -> Settings:
    return unique_settings({"streams": [lab.stream(storage_root=str(root))]}, ingest={"batch_window": 0.1})


def config_file(lab: Lab, s: Settings, path: Path) -> Path:
    st = s.streams[0]
    return write_config(s, path, (
        f'[[streams]]\nname = "{st.name}"\nsite = "ORM"\ninstrument = "LST1"\nsource_rse = "{SOURCE}"\n'
        f'storage_root = "{st.storage_root}"\nscope = "lst"\ndataset = "{st.dataset}"\n'
        f'rules = [{{ rse_expression = "{ARCHIVE}", copies = 1, activity = "User Subscriptions" }}]\n'))


def cli(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "injector.cli", "--config", str(config), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def publish_cli(config: Path, path: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return cli(config, "publish", path, "--site", "ORM", "--instrument", "LST1", "--night", NIGHT, cwd=cwd)


def publish_raw(s: Settings, events: list[FileClosed]) -> None:
    """As a DAQ that does not canonicalise: the event goes out exactly as built."""
    conn = connection(s.broker)
    try:
        Publisher(conn).publish([outgoing(e, s.broker.daq_exchange) for e in events])
    finally:
        conn.release()


def ingest(s: Settings, n: int) -> None:
    """Run an ingest consumer until it took n events."""
    worker = ingest_worker(s)
    with running(worker):
        wait_for(lambda: worker.stats.messages == n, timeout=60, what=f"{n} events ingested")


def ingest_all(s: Settings, n: int) -> list[Any]:
    """Ingest n events; the dead letters they made, taken off the dead-letter queue."""
    ingest(s, n)
    return get_all(s, topology.dead_letter_queue(s.ingest.queue))


def lst_dids(lab: Lab) -> list[str]:
    """Every file DID of this lab's corner of Rucio."""
    found = lab.client.list_dids("lst", {"name": f"{lab.root}/*"}, did_type="file")
    return sorted(str(d) for d in found)


@pytest.fixture
def tree(lab: Lab) -> Path:
    """root/20261129/x.fits and root/alias -> 20261129."""
    real = lab.write(f"{NIGHT}/x.fits", b"one file, one DID " * 100)
    os.symlink(NIGHT, lab.root / "alias")
    return real


def test_a_file_published_by_its_real_path_and_through_a_symlinked_alias_is_one_did(lab, tree, tmp_path):
    s = settings_with_root(lab, lab.root)
    alias = lab.root / "alias" / "x.fits"
    with declared(s):
        pub = publish_cli(config_file(lab, s, tmp_path / "c.toml"), str(alias))
        assert pub.returncode == 0, pub.stderr
        assert f" {tree} size=" in pub.stdout, "the CLI announces the real path"
        with DaqPublisher(s.broker, s.streams) as daq:
            sent = daq.publish([file_closed(p, site="ORM", instrument="LST1", night=NIGHT) for p in (alias, tree)])
        assert [e.path for e in sent] == [str(tree), str(tree)]
        assert ingest_all(s, 3) == []
    assert lst_dids(lab) == [str(tree)]
    assert lab.content(f"LST1_{lab.tag}_{NIGHT}_raw") == [str(tree)]
    assert lab.replicas([str(tree)])[str(tree)]["rses"] == {SOURCE: [f"file://localhost{tree}"]}


def test_a_non_canonical_path_published_raw_is_dead_lettered_path_not_canonical_and_listed(lab, tree, tmp_path):
    s = settings_with_root(lab, lab.root)
    alias = lab.root / "alias" / "x.fits"
    event = file_closed(alias, site="ORM", instrument="LST1", night=NIGHT)
    with declared(s):
        publish_raw(s, [event])
        ingest(s, 1)
        out = cli(config_file(lab, s, tmp_path / "c.toml"), "dlq", "list", s.ingest.queue, "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["by_reason"] == {"path-not-canonical": 1}, listed
    (dead,) = listed["messages"]
    assert dead["event_id"] == str(event.event_id) and str(event.event_id) in dead["error"]
    assert f"field path {str(alias)!r}" in dead["error"] and f"announce {str(tree)!r}" in dead["error"]
    assert lst_dids(lab) == []


def test_a_symlink_leaving_the_root_is_refused_path_outside_root_by_publish_and_by_ingest(lab, tmp_path):
    s = settings_with_root(lab, lab.root)
    outside = lab.client.source_dir / f"{lab.tag}-elsewhere"  # under the RSE prefix: Rucio alone would take it
    (outside / NIGHT).mkdir(parents=True)
    (outside / NIGHT / "y.fits").write_bytes(b"not this stream's file")
    os.symlink(outside, lab.root / "escape")
    escaped = lab.root / "escape" / NIGHT / "y.fits"
    with declared(s):
        pub = publish_cli(config_file(lab, s, tmp_path / "c.toml"), str(escaped))
        assert pub.returncode == exits.BAD_CONFIG, pub.stdout
        assert f"{str(escaped)!r} (its real path is {str(outside / NIGHT / 'y.fits')!r}) is outside" in pub.stderr
        publish_raw(s, [file_closed(escaped, site="ORM", instrument="LST1", night=NIGHT)])
        (dead,) = ingest_all(s, 1)
    assert dead.properties["application_headers"][deadletter.REASON] == "path-outside-root"
    assert lst_dids(lab) == []


def test_a_relative_publish_from_inside_a_symlinked_root_is_ingested_under_the_configured_root(lab, tmp_path):
    link = lab.client.source_dir / f"{lab.tag}-link"  # the configured root is a symlink to the real directory
    os.symlink(lab.root, link)
    lab.write(f"{NIGHT}/z.fits", b"through the link")
    s = settings_with_root(lab, link)
    configured = f"{link}/{NIGHT}/z.fits"
    with declared(s):
        pub = publish_cli(config_file(lab, s, tmp_path / "c.toml"), f"{NIGHT}/z.fits", cwd=link)
        assert pub.returncode == 0, pub.stderr
        assert f" {configured} size=" in pub.stdout
        assert ingest_all(s, 1) == []
    assert lab.replicas([configured])[configured]["rses"] == {SOURCE: [f"file://localhost{configured}"]}
    assert lst_dids(lab) == []  # nothing under the physical spelling


def two_streams(first: Path, second: Path) -> str:
    return "".join(
        f'[[streams]]\nname = "{name}"\nsite = "ORM"\ninstrument = "{inst}"\nsource_rse = "{SOURCE}"\n'
        f'storage_root = "{root}"\nscope = "lst"\ndataset = "{inst}_{{date}}"\n'
        f'rules = [{{ rse_expression = "{ARCHIVE}" }}]\n'
        for name, inst, root in (("e3-raw", "E3", first), ("e4-raw", "E4", second)))


@pytest.mark.parametrize("shape", ["equal", "nested", "equal-through-a-symlink"])
def test_overlapping_storage_roots_stop_every_verb_naming_both_streams(tmp_path, shape):
    data = tmp_path / "data" / "e3"
    (data / "sub").mkdir(parents=True)
    os.symlink(data, tmp_path / "e3-link")
    second = {"equal": data, "nested": data / "sub", "equal-through-a-symlink": tmp_path / "e3-link"}[shape]
    config = tmp_path / "c.toml"
    config.write_text(two_streams(data, second))
    for verb in (["config", "check"], ["publish", str(data / "sub" / "f"), "--site", "ORM", "--instrument", "E3"],
                 ["watch"]):
        out = cli(config, *verb)
        assert out.returncode == exits.BAD_CONFIG, (verb, out.stdout, out.stderr)
        assert "streams 'e3-raw' and 'e4-raw' have overlapping storage roots" in out.stderr, (verb, out.stderr)


def test_watch_refuses_at_start_a_stream_whose_dataset_template_needs_a_night_it_cannot_read(lab, tmp_path):
    s = settings_with_root(lab, lab.root)
    config = config_file(lab, s, tmp_path / "c.toml")  # dataset LST1_<tag>_{night}_raw, no path_fields
    with declared(s):
        proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "--config", str(config), "watch"],
                                stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"watch started anyway: {err}")
    assert proc.returncode == exits.BAD_CONFIG, err
    assert "stream 'lst1-raw'" in err and "needs ['night']" in err and "path_fields" in err
