"""The watcher's decisions without inotify or a broker: fields from paths, ignore rules, settling, batching."""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections.abc import Sequence

import pytest
from watchdog.events import DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileMovedEvent

from injector.config import Settings, Stream, parse
from injector.errors import BrokerUnavailable, ConfigError, PublishFailed
from injector.events import FileClosed
from producers.announcer import Announcer
from producers.candidates import Candidate, Settler
from producers.edge import Edge
from producers.hashing import HashPool
from producers.outbox import Drained
from producers.refusals import Refusal, Refusals
from producers.watch import EventHandler, Options, Watcher, announcement, fields_from_path, ignored, selected
from tests.conftest import STREAMS


def stream(**over: object) -> Stream:
    return parse({"streams": [{**STREAMS["streams"][0], **over}]}).streams[0]


# --- path_fields in the config --------------------------------------------------------------------

def test_a_path_fields_pattern_with_known_groups_is_accepted():
    s = stream(path_fields=r"(?P<night>\d{8})/.*Run(?P<run>\d+)\.(?P<datatype>\w+)")
    assert s.path_fields is not None


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(?P<night>\d{8}", "is not a valid regular expression"),
    (r"(?P<telescope>\w+)/(?P<night>\d{8})", r"unknown group\(s\) \['telescope'\]"),
    (r"\d{8}/Run\d+", "no named group"),
])
def test_a_bad_path_fields_pattern_is_refused_naming_the_stream_and_the_field(pattern, why):
    with pytest.raises(ConfigError, match=rf"streams\[0\] \(lst1-raw\)\.path_fields: .*{why}"):
        stream(path_fields=pattern)


# --- fields from the path -------------------------------------------------------------------------

def test_night_run_and_datatype_are_read_from_the_path_and_run_is_an_int():
    s = stream(path_fields=r"^(?P<night>\d{8})/LST-1\.(?P<datatype>[a-z]+)\.Run(?P<run>\d+)")
    assert fields_from_path(s, "20261124/LST-1.raw.Run00042.0000.fits.fz") == (
        {"night": "20261124", "run": 42, "datatype": "raw"}, [])


def test_the_streams_own_datatype_wins_over_the_path():
    s = stream(datatype="raw", path_fields=r"(?P<night>\d{8})/(?P<datatype>\w+)/")
    assert fields_from_path(s, "20261124/dl1/x.h5") == ({"datatype": "raw", "night": "20261124"}, [])


def test_an_optional_group_that_did_not_match_is_simply_absent():
    s = stream(path_fields=r"(?P<night>\d{8})/(?:.*Run(?P<run>\d+))?")
    assert fields_from_path(s, "20261124/pedestal.fits") == ({"night": "20261124"}, [])


def test_a_path_that_does_not_match_gives_no_fields_and_names_the_pattern():
    s = stream(path_fields=r"^(?P<night>\d{8})/")
    fields, problems = fields_from_path(s, "calibration/pedestal.fits")
    assert fields == {}
    assert problems == [r"does not match path_fields '^(?P<night>\d{8})/'"]


def test_a_value_that_cannot_be_in_an_event_is_left_out_and_reported():
    s = stream(path_fields=r"^(?P<night>[\d-]+)/Run(?P<run>\w+)")
    fields, problems = fields_from_path(s, "2026-11-24/Run42a.fits")
    assert fields == {}
    assert [p.split(" (")[0] for p in problems] == ["night '2026-11-24'", "run '42a'"]


def test_without_path_fields_only_the_stream_gives_fields():
    assert fields_from_path(stream(), "20261124/Run1.fits") == ({}, [])


# --- ignore rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("relative", [
    ".hidden.fits", "20261124/.LST.Run1.fits.swp", "20261124/Run1.fits.tmp", "20261124/Run1.fits.part",
    ".snapshot/20261124/Run1.fits", "20261124.tmp/Run1.fits", "a.part/b/Run1.fits",
])
def test_hidden_and_temporary_names_are_ignored_also_as_directories(relative):
    assert ignored(relative)


@pytest.mark.parametrize("relative", ["20261124/LST-1.Run00042.fits.fz", "Run1.fits", "tmp/part/Run1.fits",
                                      "20261124/Run1.tmpl"])
def test_ordinary_names_are_announced(relative):
    assert not ignored(relative)


def test_extra_globs_match_names_and_globs_with_a_slash_match_the_relative_path():
    assert ignored("20261124/Run1.log", ["*.log"])
    assert ignored("monitoring/20261124/Run1.fits", ["monitoring/*"])
    assert not ignored("20261124/monitoring.fits", ["monitoring/*"])
    assert not ignored("20261124/Run1.fits", ["*.log", "monitoring/*"])


# --- from watchdog events to candidates -----------------------------------------------------------

def handler_and_watcher(root: str, **options: object) -> tuple[EventHandler, Watcher, Stream]:
    s = stream(storage_root=root)
    watcher = Watcher([s], Options(**options))  # type: ignore[arg-type]
    return EventHandler(watcher, s), watcher, s


def taken(watcher: Watcher) -> list[tuple[str, float, bool]]:
    out = []
    while not watcher.candidates.empty():
        c = watcher.candidates.get_nowait()
        out.append((c.path, c.quiet, c.tree))
    return out


def test_a_close_a_rename_and_a_move_in_are_candidates_and_creations_and_temporary_names_are_not():
    handler, watcher, _ = handler_and_watcher("/data/lst1", settle=2.0, found_quiet=30.0)
    for event in [
        FileClosedEvent("/data/lst1/20261124/Run1.fits"),
        FileCreatedEvent("/data/lst1/20261124/Run2.fits"),  # opened, not closed: nothing yet
        FileClosedEvent("/data/lst1/20261124/Run2.fits.tmp"),
        FileMovedEvent("/data/lst1/20261124/Run2.fits.tmp", "/data/lst1/20261124/Run2.fits"),
        FileMovedEvent("", "/data/lst1/20261124/Run3.fits"),  # moved in from outside the tree
        FileMovedEvent("/data/lst1/20261124/Run3.fits", ""),  # moved out
        FileMovedEvent("/data/lst1/a.tmp/Run4.fits", "/data/lst1/a/Run4.fits", is_synthetic=True),
        DirMovedEvent("/data/lst1/a.tmp", "/data/lst1/a"),
        DirCreatedEvent("/data/lst1/20261125"),
        DirCreatedEvent("/data/lst1/b", is_synthetic=True),
        FileClosedEvent("/data/other/Run5.fits"),
    ]:
        handler.dispatch(event)
    assert taken(watcher) == [
        ("/data/lst1/20261124/Run1.fits", 2.0, False),
        ("/data/lst1/20261124/Run2.fits", 2.0, False),
        ("/data/lst1/20261124/Run3.fits", 2.0, False),
        ("/data/lst1/a", 2.0, True),
        ("/data/lst1/20261125", 30.0, True),
    ]


def test_streams_splitting_one_root_by_datatype_announce_each_file_once_by_the_first_selected():
    raw = stream(datatype="raw")
    dl1 = stream(name="lst1-dl1", datatype="dl1")
    watcher = Watcher([dl1, raw], Options())
    EventHandler(watcher, raw).dispatch(FileClosedEvent("/data/lst1/dl1/Run1.h5"))
    EventHandler(watcher, dl1).dispatch(FileClosedEvent("/data/lst1/dl1/Run1.h5"))
    assert [(c.stream.name, c.path) for c in [watcher.candidates.get_nowait()]] == [
        ("lst1-dl1", "/data/lst1/dl1/Run1.h5")]
    assert watcher.candidates.empty()


def test_a_directory_candidate_stands_for_every_announceable_file_below_it(tmp_path):
    for rel in ["n/Run1.fits", "n/sub/Run2.fits", "n/Run3.fits.part", "n/.x/Run4.fits", "n/Run5.log"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "n/Run1.fits", tmp_path / "n/link.fits")
    _, watcher, s = handler_and_watcher(str(tmp_path), ignore=["*.log"])
    files = watcher.files(Candidate(s, str(tmp_path / "n"), 7.0, tree=True))
    assert sorted((c.path, c.quiet, c.tree) for c in files) == [
        (str(tmp_path / "n/Run1.fits"), 7.0, False), (str(tmp_path / "n/sub/Run2.fits"), 7.0, False)]


def test_a_stop_during_a_long_backlog_leaves_the_files_not_yet_read_waiting(tmp_path):
    for n in range(3):
        (tmp_path / f"Run{n}.fits").write_bytes(b"x")
    _, watcher, s = handler_and_watcher(str(tmp_path))
    watcher.candidates.put(Candidate(s, str(tmp_path), 0.0, tree=True))
    published: list[list[str]] = []
    a = announcer(published)
    edge = Edge(watcher, Refusals(parse({})), HashPool(1, announcement), a)
    halts = iter([False, True])
    edge.step(lambda: None, lambda: next(halts), timeout=0)
    edge.pool.wait(5)
    edge.step(lambda: None, lambda: True, timeout=0)
    assert len(a.pending) == 1
    assert sorted([c.path for c in edge.pool.waiting()] + [a.pending[0].path]) == [
        str(tmp_path / f"Run{n}.fits") for n in range(3)]
    edge.pool.close()


# --- the event of a file --------------------------------------------------------------------------

def test_the_announcement_of_a_file_carries_its_size_adler32_and_path_fields(tmp_path):
    s = stream(storage_root=str(tmp_path), datatype="raw", path_fields=r"^(?P<night>\d{8})/.*Run(?P<run>\d+)")
    path = tmp_path / "20261124" / "LST-1.Run00042.fits"
    path.parent.mkdir()
    data = b"\x00\x01" * 40_000
    path.write_bytes(data)
    event = announcement(Candidate(s, str(path), 0.0))
    assert event is not None
    assert (event.site, event.instrument, event.path, event.size, event.adler32, event.night, event.run,
            event.datatype) == ("ORM", "LST1", str(path), 80_000,
                                f"{zlib.adler32(data) & 0xFFFFFFFF:08x}", "20261124", 42, "raw")


def test_an_unmatched_file_is_announced_anyway_with_a_warning_naming_file_and_pattern(tmp_path, caplog):
    s = stream(storage_root=str(tmp_path), path_fields=r"^(?P<night>\d{8})/")
    path = tmp_path / "pedestal.fits"
    path.write_bytes(b"p")
    with caplog.at_level(logging.WARNING, "producers.watch"):
        event = announcement(Candidate(s, str(path), 0.0))
    assert event is not None and event.night is None and event.run is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert str(path) in caplog.text and r"^(?P<night>\d{8})/" in caplog.text


def test_a_file_gone_before_its_checksum_is_not_announced_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "producers.watch"):
        assert announcement(Candidate(stream(storage_root=str(tmp_path)), str(tmp_path / "gone.fits"), 0.0)) is None
    assert "vanished" in caplog.text


# --- settling -------------------------------------------------------------------------------------

def test_a_closed_file_with_no_settle_is_ready_at_once_and_only_once(tmp_path):
    settler, s = Settler(), stream(storage_root=str(tmp_path))
    c = Candidate(s, str(tmp_path / "a.fits"), 0.0)
    settler.add(c)
    settler.add(c)
    assert settler.ready() == [c]
    assert settler.ready() == []


def test_a_settling_file_waits_until_unmodified_long_enough_and_a_write_restarts_the_wait(tmp_path):
    path = tmp_path / "a.fits"
    path.write_bytes(b"1")
    now = [time.time()]
    settler = Settler(clock=lambda: now[0], monotonic=lambda: now[0])
    c = Candidate(stream(storage_root=str(tmp_path)), str(path), 5.0)
    settler.add(c)
    assert settler.ready() == []
    now[0] += 3
    path.write_bytes(b"12")  # the writer reopened it
    os.utime(path, (now[0], now[0]))
    now[0] += 3
    assert settler.ready() == [] and settler.waiting() == [c]
    now[0] += 2.5
    assert settler.ready() == [c]
    assert settler.waiting() == []


def test_an_old_file_is_ready_at_once_a_vanished_one_is_forgotten_and_a_close_beats_a_sighting(tmp_path):
    s, old, gone, fresh = stream(storage_root=str(tmp_path)), tmp_path / "old", tmp_path / "gone", tmp_path / "new"
    for p in (old, gone, fresh):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 600, time.time() - 600))
    settler = Settler()
    for p in (old, gone, fresh):
        settler.add(Candidate(s, str(p), 60.0))
    gone.unlink()
    assert [c.path for c in settler.ready()] == [str(old)]
    settler.add(Candidate(s, str(fresh), 0.0))  # its close was seen after all
    settler.add(Candidate(s, str(fresh), 60.0))  # and a walk finds it again
    assert [c.path for c in settler.ready()] == [str(fresh)]
    assert settler.waiting() == []


# --- batching and publishing ----------------------------------------------------------------------

class FlakySink:
    """A broker that refuses the first `failures` publishes."""

    def __init__(self, published: list[list[str]], failures: int) -> None:
        self.published = published
        self.failures = failures

    def publish(self, events: Sequence[FileClosed]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise PublishFailed("broker connection lost while publishing")
        self.published.append([e.path for e in events])

    def flush(self, timeout: float) -> Drained:
        return Drained()  # what it took is published at once: nothing waits

    def waiting(self) -> list[FileClosed]:
        return []

    def close(self) -> None:
        pass


def event(n: int) -> FileClosed:
    return FileClosed.create(site="ORM", instrument="LST1", path=f"/data/lst1/Run{n}.fits", size=n, adler32="00000001")


def announcer(published: list[list[str]], failures: int = 0, refused_connects: int = 0, **kw: object) -> Announcer:
    sink = FlakySink(published, failures)
    left = [refused_connects]

    def connect(_broker: object) -> FlakySink:
        if left[0] > 0:
            left[0] -= 1
            raise BrokerUnavailable("broker unreachable")
        return sink

    return Announcer(parse({}).broker, connect=connect, max_wait=0.01, **kw)  # type: ignore[arg-type]


def test_events_wait_for_the_window_or_a_full_batch_and_go_in_batches():
    now = [0.0]
    published: list[list[str]] = []
    a = announcer(published, batch_size=2, window=0.2, clock=lambda: now[0])
    a.add(event(1))
    assert not a.due()
    now[0] += 0.2
    assert a.due()
    a.add(event(2))
    a.add(event(3))
    assert a.flush(threading.Event())
    assert published == [["/data/lst1/Run1.fits", "/data/lst1/Run2.fits"], ["/data/lst1/Run3.fits"]]
    assert a.pending == [] and not a.due()


def test_a_broker_outage_keeps_every_event_and_retries_until_it_is_published(caplog):
    published: list[list[str]] = []
    a = announcer(published, failures=2, refused_connects=2)
    e = event(1)
    a.add(e)
    with caplog.at_level(logging.DEBUG, "producers.announcer"):
        assert a.flush(threading.Event())
    assert published == [["/data/lst1/Run1.fits"]]
    assert sum("broker unavailable" in r.getMessage() for r in caplog.records) == 4
    # "announced" is logged by the outbox's drainer once the broker confirmed (tests/unit/test_outbox.py)
    handed = [r for r in caplog.records if r.getMessage().startswith("in the outbox")]
    assert [(r.getMessage(), getattr(r, "event_id", None)) for r in handed] == [
        ("in the outbox: /data/lst1/Run1.fits", str(e.event_id))]


def test_a_stop_during_an_outage_keeps_the_events_pending():
    published: list[list[str]] = []
    a = announcer(published, failures=1000)
    stop = threading.Event()
    stop.set()
    a.add(event(1))
    assert not a.flush(stop)
    assert [e.path for e in a.pending] == ["/data/lst1/Run1.fits"]
    assert not a.flush_final(0.05)
    assert [e.path for e in a.pending] == ["/data/lst1/Run1.fits"] and published == []


# --- the start check and canonical paths ----------------------------------------------------------

def test_watch_refuses_a_stream_whose_template_needs_a_field_neither_its_datatype_nor_path_fields_give(tmp_path):
    ok = stream(storage_root=str(tmp_path), datatype="raw", dataset="LST1_{night}_{datatype}_{date}",
                path_fields=r"^(?P<night>\d{8})/")
    assert selected(parse_settings(ok), []) == [ok]
    bad = stream(storage_root=str(tmp_path), dataset="LST1_{night}_{run}_{datatype}", path_fields=r"^(?P<night>\d{8})/")
    with pytest.raises(ConfigError, match=r"stream 'lst1-raw'.*needs \['datatype', 'run'\].*path_fields"):
        selected(parse_settings(bad), [])


def parse_settings(s: Stream) -> Settings:
    return parse({"streams": [s.model_dump()]})


def test_a_file_reached_through_a_symlinked_directory_is_announced_under_its_real_path(tmp_path):
    (tmp_path / "20261124").mkdir()
    (tmp_path / "20261124" / "Run1.fits").write_bytes(b"x")
    os.symlink("20261124", tmp_path / "alias")
    (tmp_path.parent / f"{tmp_path.name}-out.fits").write_bytes(b"y")
    os.symlink(f"../{tmp_path.name}-out.fits", tmp_path / "escape.fits")
    s = stream(storage_root=str(tmp_path), path_fields=r"^(?P<night>\d{8})/")
    event = announcement(Candidate(s, str(tmp_path / "alias" / "Run1.fits"), 0.0))
    assert event is not None and (event.path, event.night) == (str(tmp_path / "20261124" / "Run1.fits"), "20261124")
    refused = announcement(Candidate(s, str(tmp_path / "escape.fits"), 0.0))
    assert isinstance(refused, Refusal) and refused.reason == "path-outside-root"
    assert "escape.fits" in refused.error and "is outside stream 'lst1-raw'" in refused.error
