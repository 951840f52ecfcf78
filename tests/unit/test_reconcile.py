"""The reconciler and status on the in-memory Rucio (the same behaviour is proven on the real server in
tests/integration/test_reconcile_rucio.py)."""

from datetime import UTC, datetime, timedelta

import pytest

from consumers.cleanup import cleanup
from consumers.ingest import ingest
from injector import marks
from injector.config import parse
from injector.errors import ConfigError, PublishFailed
from injector.events import FileClosed, RucioEvent, archived_event_id, decode_file_archived
from injector.streams import name_pattern
from injector.testing import FakeRucio, Unavailable
from operations import status
from operations.findings import diagnose_rule
from operations.inventory import dataset_pattern, dataset_regex
from operations.reconcile import Options, sweep
from tests.conftest import STREAMS

SRC, DST = "ORM-BUFFER", "PIC-ARCHIVE"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
NAMES = [f"/data/lst1/20261124/run{i:05d}.fits.fz" for i in range(3)]
LATER = timedelta(0)  # a grace period already over: the sweep acts on sources released just now


@pytest.fixture
def rucio(settings):
    r = FakeRucio(rses={SRC: "file://localhost/data/"})
    events = [FileClosed.create(site="ORM", instrument="LST1", path=n, size=100 + i, adler32=f"0000000{i + 1}",
                                night="20261124") for i, n in enumerate(NAMES)]
    ingest(events, r, settings)
    return r


class Broker:
    """Confirmed publishing as the reconciler sees it; `refuse` makes the next publish fail."""

    def __init__(self):
        self.messages = []
        self.refuse = False

    def __call__(self, messages):
        if self.refuse and messages:
            raise PublishFailed("nacked by the broker (test)")
        self.messages.extend(messages)


def run(settings, rucio, broker=None, **options):
    found = sweep(settings, rucio, broker if broker is not None else Broker(), Options(**options), ["lst1-raw"])
    return [(f.action, f.kind, f.subject.split(":", 1)[1]) for f in found]


def archived(rucio, *names):
    for n in names:
        rucio.add_replica(DST, "lst", n)


def test_a_verified_file_whose_transfer_done_was_lost_is_released_once(settings, rucio):
    archived(rucio, *NAMES[:2])
    assert sorted(run(settings, rucio)) == [("done", "release-source", n) for n in NAMES[:2]]
    assert rucio.tombstoned == {(SRC, "lst", n) for n in NAMES[:2]}
    assert all(rucio.meta[("lst", n)].get(marks.RELEASED_AT) for n in NAMES[:2])
    assert run(settings, rucio) == [], "released once: within the grace period nothing more to do"


def test_dry_run_changes_nothing_and_publishes_nothing(settings, rucio):
    archived(rucio, NAMES[0])
    broker = Broker()
    assert run(settings, rucio, broker, dry_run=True, fix=True) == [("would", "release-source", NAMES[0])]
    rucio.reap(SRC)
    assert run(settings, rucio, broker, dry_run=True) == [("would", "release-source", NAMES[0])], "still there"
    assert rucio.calls["set_tombstones"] == rucio.calls["mark"] == 0 and broker.messages == []


@pytest.mark.parametrize("state", ["COPYING", "UNAVAILABLE", "BEING_DELETED"])
def test_an_archive_copy_that_is_not_available_never_releases_the_source(settings, rucio, state):
    rucio.add_replica(DST, "lst", NAMES[0], state=state)
    assert run(settings, rucio) == [] and not rucio.tombstoned


def test_every_rule_of_the_stream_must_be_satisfied_before_release(rucio):
    two = {"streams": [dict(STREAMS["streams"][0], rules=[{"rse_expression": DST}, {"rse_expression": "T1S",
                                                                                    "copies": 2}])]}
    s = parse(two)
    rucio.expressions["T1S"] = {"CNAF", "DESY"}
    archived(rucio, NAMES[0])
    rucio.add_replica("CNAF", "lst", NAMES[0])
    assert [f for f in run(s, rucio) if f[1] == "release-source"] == []
    rucio.add_replica("DESY", "lst", NAMES[0])
    assert [f for f in run(s, rucio) if f[1] == "release-source"] == [("done", "release-source", NAMES[0])]


def test_a_locked_source_is_reported_and_its_neighbours_are_still_released(settings, rucio):
    archived(rucio, *NAMES[:2])
    rucio.locked.add((SRC, "lst", NAMES[1]))
    assert sorted(run(settings, rucio)) == [("done", "release-source", NAMES[0]),
                                            ("report", "release-refused", NAMES[1])]
    assert rucio.tombstoned == {(SRC, "lst", NAMES[0])}


def test_a_file_gone_from_the_source_is_announced_exactly_once(settings, rucio):
    archived(rucio, NAMES[0])
    broker = Broker()
    run(settings, rucio, broker)
    rucio.reap(SRC)
    assert run(settings, rucio, broker) == [], "within the grace period cleanup's deletion-done is still coming"
    assert run(settings, rucio, broker, grace=LATER) == [("done", "announce-archived", NAMES[0])]
    assert run(settings, rucio, broker, grace=LATER) == []
    (msg,) = broker.messages
    ev = decode_file_archived(msg.body)
    assert (ev.path, ev.size, ev.adler32, ev.destinations) == (NAMES[0], 100, "00000001", [DST])
    assert msg.message_id == str(ev.event_id) == str(archived_event_id("lst", NAMES[0]))
    assert msg.routing_key == "file.archived.ORM.LST1" and msg.exchange == settings.broker.daq_exchange


def test_announced_files_are_finished_and_their_replicas_are_not_read_again(settings, rucio):
    archived(rucio, *NAMES)
    run(settings, rucio)
    rucio.reap(SRC)
    assert len(run(settings, rucio, grace=LATER)) == 3
    rucio.calls.clear()
    assert run(settings, rucio, grace=LATER) == [] and rucio.calls["replicas"] == 0 and rucio.calls["marks"] == 1


def test_a_file_cleanup_announced_is_not_announced_again_and_both_would_send_the_same_bytes(settings, rucio):
    archived(rucio, NAMES[0])
    run(settings, rucio)
    rucio.reap(SRC)
    deletion = RucioEvent(event_type="deletion-done", created_at="2026-11-25 01:02:03.000000",
                          payload={"scope": "lst", "name": NAMES[0], "rse": SRC, "url": "file://localhost" + NAMES[0]})
    (out,) = cleanup([deletion], rucio, settings)
    broker = Broker()
    assert run(settings, rucio, broker, grace=LATER) == [] and broker.messages == []
    del rucio.meta[("lst", NAMES[0])][marks.ANNOUNCED]  # as if cleanup's emit had never been confirmed
    run(settings, rucio, broker, grace=LATER)
    assert [m.body for m in broker.messages] == [out.emit[0].body]


def test_a_refused_publish_is_not_marked_announced_and_the_next_sweep_sends_the_identical_event(settings, rucio):
    archived(rucio, NAMES[0])
    run(settings, rucio)
    rucio.reap(SRC)
    broker = Broker()
    broker.refuse = True
    assert run(settings, rucio, broker, grace=LATER) == [("report", "announce-failed", NAMES[0])]
    assert marks.ANNOUNCED not in rucio.meta[("lst", NAMES[0])]
    decided = rucio.meta[("lst", NAMES[0])][marks.ARCHIVED_AT]
    broker.refuse = False
    later = sweep(settings, rucio, broker, Options(), now=datetime.now(UTC) + timedelta(days=3))  # same event
    assert [(f.action, f.kind) for f in later] == [("done", "announce-archived")]
    (msg,) = broker.messages
    assert decode_file_archived(msg.body).archived_at.isoformat() == decided, "decided at the first attempt"


def test_a_source_gone_without_a_verified_archive_is_reported_as_lost(settings, rucio):
    rucio.add_replica(DST, "lst", NAMES[0], state="COPYING")
    rucio.pfns.pop((SRC, "lst", NAMES[0]))
    broker = Broker()
    assert run(settings, rucio, broker) == [("report", "source-lost", NAMES[0])] and broker.messages == []


def legacy(rucio, name):
    """A file as ingest registered it before registration and attachment were one call: its dataset recorded on
    it, and (a crash between the two calls, the event lost) not attached."""
    rucio.meta[("lst", name)] = {marks.DATASET: "lst:LST1_20261124_raw", marks.STREAM: "lst1-raw",
                                 marks.PATH: name}
    rucio.datasets[("lst", "LST1_20261124_raw")].discard(("lst", name))


def test_a_file_not_attached_to_its_dataset_is_reported_and_attached_with_fix(settings, rucio):
    legacy(rucio, NAMES[2])
    assert run(settings, rucio) == [("report", "not-attached", NAMES[2])]
    assert run(settings, rucio, fix=True, dry_run=True) == [("would", "not-attached", NAMES[2])]
    assert run(settings, rucio, fix=True) == [("done", "not-attached", NAMES[2])]
    assert ("lst", NAMES[2]) in rucio.datasets[("lst", "LST1_20261124_raw")]
    assert run(settings, rucio) == []


def orphan(rucio):
    """NAMES[2] registered, never attached (a file of the earlier ingest), then ops closed its dataset."""
    legacy(rucio, NAMES[2])
    rucio.closed.add(("lst", "LST1_20261124_raw"))


def test_an_orphan_of_a_closed_dataset_is_named_with_its_cause_and_what_the_operator_can_do(settings, rucio):
    orphan(rucio)
    (f,) = sweep(settings, rucio, Broker(), Options(fix=True), ["lst1-raw"])
    assert (f.kind, f.action, f.subject) == ("orphaned", "report", f"lst:{NAMES[2]}")
    assert "dataset lst:LST1_20261124_raw is closed" in f.detail and "no rule archives it" in f.detail
    assert "reopen the dataset" in f.detail and 'on_closed_dataset = "next"' in f.detail and not f.fix
    assert ("lst", "LST1_20261124_raw.2") not in rucio.datasets, "the default policy never rolls on"


def test_with_next_fix_attaches_orphans_to_the_next_open_dataset_and_records_it_there(rucio):
    s = parse({"streams": [dict(STREAMS["streams"][0], on_closed_dataset="next")]})
    orphan(rucio)
    assert run(s, rucio) == [("report", "orphaned", NAMES[2])]
    assert run(s, rucio, fix=True, dry_run=True) == [("would", "orphaned", NAMES[2])]
    assert run(s, rucio, fix=True) == [("done", "orphaned", NAMES[2])]
    assert rucio.datasets[("lst", "LST1_20261124_raw.2")] == {("lst", NAMES[2])}
    assert rucio.meta[("lst", NAMES[2])][marks.DATASET] == "lst:LST1_20261124_raw.2"
    assert [(r.name, r.rse_expression) for r in rucio.rules if r.name.endswith(".2")] == [
        ("LST1_20261124_raw.2", DST)]
    assert run(s, rucio) == []


def test_a_dataset_without_the_stream_rule_is_reported_and_given_it_with_fix(settings, rucio):
    rucio.rules.clear()
    found = sweep(settings, rucio, Broker(), Options(), ["lst1-raw"])
    assert [(f.kind, f.subject, f.action) for f in found] == [("rule-missing", "lst:LST1_20261124_raw", "report")]
    sweep(settings, rucio, Broker(), Options(fix=True), ["lst1-raw"])
    assert [(r.name, r.rse_expression) for r in rucio.rules] == [("LST1_20261124_raw", DST)]


def released_long_ago(settings, rucio):
    archived(rucio, NAMES[0])
    run(settings, rucio)  # released now; the reaper never comes
    return sweep(settings, rucio, Broker(), Options(grace=timedelta(minutes=30)),
                 now=datetime.now(UTC) + timedelta(hours=1))


@pytest.mark.parametrize(("setting", "cause"), [
    ({"availability_delete": False}, "availability_delete false"),
    ({"protocols": [{"hostname": "", "domains": {"wan": {"delete": 1}}}]}, "empty hostname"),
    ({"protocols": [{"hostname": "localhost", "domains": {"wan": {"read": 1}}}]}, "no WAN delete protocol"),
    ({"protocols": [{"hostname": "", "domains": {"wan": {"delete": 1}}},
                    {"hostname": "localhost", "domains": {"wan": {"delete": 2}}}]}, "empty hostname"),
])
def test_a_released_source_the_reaper_cannot_delete_names_the_rse_cause(settings, rucio, setting, cause):
    rucio.rse_settings[SRC] = setting
    (f,) = released_long_ago(settings, rucio)
    assert (f.kind, f.action) == ("source-not-deleted", "report") and cause in f.detail and not f.fix


def test_a_released_source_held_by_a_lock_or_read_by_a_transfer_names_that(settings, rucio):
    (pin,) = [r for r in rucio.rules if r.name == "LST1_20261124_raw"]
    rucio.lock_table.append({"scope": "lst", "name": NAMES[0], "rse": SRC, "state": "OK", "rule_id": pin.id})
    rucio.in_flight.add((SRC, DST, "lst", NAMES[0]))
    (f,) = released_long_ago(settings, rucio)
    assert f"rule {pin.id}" in f.detail and "holds a lock" in f.detail and "transfer to PIC-ARCHIVE" in f.detail


def test_a_released_source_without_visible_cause_gets_its_tombstone_again_with_fix(settings, rucio):
    (f,) = released_long_ago(settings, rucio)
    assert "no cause visible" in f.detail and "not greedy" in f.detail and f.fix
    rucio.tombstoned.clear()  # as if someone reset it
    (again,) = sweep(settings, rucio, Broker(), Options(fix=True, grace=timedelta(0)),
                     now=datetime.now(UTC) + timedelta(hours=1))
    assert again.action == "done" and rucio.tombstoned == {(SRC, "lst", NAMES[0])}


def test_a_stuck_rule_is_reported_and_boosted_only_with_fix(settings, rucio):
    (rule,) = rucio.rules
    rule.state, rule.error = "STUCK", "SOURCE_NOT_FOUND"
    (f,) = sweep(settings, rucio, Broker(), Options(), ["lst1-raw"])
    assert (f.kind, f.action) == ("rule-stuck", "report") and rule.id in f.detail and rucio.boosted == []
    (f,) = sweep(settings, rucio, Broker(), Options(fix=True), ["lst1-raw"])
    assert f.action == "done" and rucio.boosted == [rule.id]


def test_an_unknown_stream_name_is_an_error(settings, rucio):
    with pytest.raises(ConfigError, match="no stream named nope"):
        sweep(settings, rucio, Broker(), Options(), ["nope"])


def test_rucio_unreachable_makes_a_failed_sweep_finding_not_a_crash(settings, rucio):
    rucio.fail("list_files", Unavailable("503 Service Unavailable"))
    (f,) = sweep(settings, rucio, Broker(), Options(), ["lst1-raw"])
    assert (f.kind, f.action) == ("sweep-failed", "report") and "503" in f.detail


def test_status_puts_every_file_in_one_stage_and_counts_stuck_locks(settings, rucio, monkeypatch):
    monkeypatch.setattr(status, "dead_lettered", lambda s: {})
    monkeypatch.setattr(status, "queue_depths", lambda s: {})
    archived(rucio, NAMES[0])
    run(settings, rucio)  # NAMES[0] released
    rucio.add_replica(DST, "lst", NAMES[1], state="UNAVAILABLE")  # NAMES[1] stuck, NAMES[2] replicating
    (rule,) = rucio.rules
    rule.state = "STUCK"
    rucio.lock_table.append({"scope": "lst", "name": NAMES[1], "rse": DST, "state": "STUCK", "rule_id": rule.id})
    counts = status.collect(settings, rucio, ["lst1-raw"])["streams"]["lst1-raw"]["lst:LST1_20261124_raw"]
    assert counts == {"registered": 3, "replicating": 2, "replicated": 0, "released": 1, "announcing": 0,
                      "archived": 0, "source-lost": 0, "stuck": 1, "dead-lettered": 0, "orphaned": 0}
    rucio.reap(SRC)
    counts = status.collect(settings, rucio, ["lst1-raw"])["streams"]["lst1-raw"]["lst:LST1_20261124_raw"]
    assert (counts["released"], counts["announcing"], counts["archived"]) == (0, 1, 0), "file-archived not sent yet"
    rucio.mark([("lst", NAMES[0], {marks.ANNOUNCED: "2026-11-24T12:00:00+00:00"})])
    counts = status.collect(settings, rucio, ["lst1-raw"])["streams"]["lst1-raw"]["lst:LST1_20261124_raw"]
    assert (counts["announcing"], counts["archived"]) == (0, 1)


def test_status_counts_orphans_in_their_own_column_not_as_files_of_the_dataset(settings, rucio, monkeypatch):
    monkeypatch.setattr(status, "dead_lettered", lambda s: {})
    monkeypatch.setattr(status, "queue_depths", lambda s: {})
    orphan(rucio)
    counts = status.collect(settings, rucio, ["lst1-raw"])["streams"]["lst1-raw"]["lst:LST1_20261124_raw"]
    assert (counts["registered"], counts["replicating"], counts["orphaned"]) == (2, 2, 1)


# Patterns and rule diagnosis.

def stream(**over):
    s = {"name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": "ORM-BUFFER",
         "storage_root": "/fefs/lst1/", "scope": "lst", "dataset": "LST1_{night}_{datatype}_raw",
         "rules": [{"rse_expression": "PIC-ARCHIVE"}], **over}
    return parse({"streams": [s]}).streams[0]


def rule(**over):
    return {"id": "r1", "state": "OK", "rse_expression": "PIC-ARCHIVE", "copies": 1, "expires_at": None,
            "locked": False, "child_rule_id": None, "error": None, **over}


def test_patterns_cover_the_stream():
    assert name_pattern(stream()) == "/fefs/lst1/*"
    assert name_pattern(stream(did_name="relative", did_prefix="lst1/")) == "lst1/*"
    assert dataset_pattern(stream()) == "LST1_*_*_raw*"  # also the successors of closed datasets: ...raw.2
    assert dataset_regex(stream()).fullmatch("LST1_20261124_calib_raw.2")
    assert not dataset_regex(stream()).fullmatch("LST1_20261124_calib_rawdata")


def test_healthy_rule_is_not_a_finding():
    assert diagnose_rule("s", "lst:ds", rule(), NOW) is None
    assert diagnose_rule("s", "lst:ds", rule(expires_at=NOW + timedelta(hours=1)), NOW) is None


def test_expired_locked_rule_names_the_lock_and_the_negative_lifetime():
    f = diagnose_rule("s", "lst:ds", rule(expires_at=NOW - timedelta(minutes=5), locked=True), NOW)
    assert f is not None and f.kind == "rule-expired"
    assert "remaining lifetime -0h05m00s" in f.detail and "locked" in f.detail and "state OK" in f.detail


def test_expired_rule_waiting_for_a_child_and_soft_deleted_rule():
    child = diagnose_rule("s", "lst:ds", rule(expires_at=NOW - timedelta(hours=2), child_rule_id="c9"), NOW)
    assert child is not None and "child rule c9" in child.detail
    plain = diagnose_rule("s", "lst:ds", rule(expires_at=(NOW - timedelta(seconds=30)).strftime(
        "%a, %d %b %Y %H:%M:%S UTC")), NOW)
    assert plain is not None and "judge-cleaner" in plain.detail


def test_stuck_rule_says_why_and_what_fix_does():
    f = diagnose_rule("s", "lst:ds", rule(state="STUCK", error="SOURCE_NOT_FOUND", locks_stuck_cnt=3), NOW)
    assert f is not None and f.kind == "rule-stuck" and "SOURCE_NOT_FOUND" in f.detail and "boost" in f.fix


def test_the_reconcile_loop_waits_out_a_rucio_outage_and_sweeps_again_as_soon_as_rucio_answers(settings, rucio):
    import threading

    from operations import reconcile

    archived(rucio, NAMES[0])
    rucio.down = True
    sweeps: list[list[str]] = []
    stop = threading.Event()

    def report(found):
        sweeps.append(sorted(f.kind for f in found))
        if len(sweeps) == 1:
            threading.Timer(0.2, lambda: setattr(rucio, "down", False)).start()
        else:
            stop.set()

    reconcile.run(settings, Options(grace=LATER), ["lst1-raw"], 3600, report, stop, metrics_port=0, rucio=rucio,
                  publish=Broker())
    assert sweeps == [["sweep-failed"], ["release-source"]], "swept again once Rucio answered, not an hour later"
    assert rucio.breaker.outages == 1 and not rucio.breaker.open


# A sweep costs the open work, not the stream's history (operations.inventory).

READS = ("content", "marks", "replicas", "rules_of", "list_files")


def finished_night(settings, rucio, when):
    """Every file of the night archived, released, reaped and announced; the next sweep marks the dataset."""
    archived(rucio, *NAMES)
    sweep(settings, rucio, Broker(), Options(), ["lst1-raw"], now=when)
    rucio.reap(SRC)
    later = when + timedelta(hours=2)  # past the release
    sweep(settings, rucio, Broker(), Options(grace=LATER), ["lst1-raw"], now=later)
    sweep(settings, rucio, Broker(), Options(grace=LATER), ["lst1-raw"], now=later)


def test_a_finished_dataset_is_marked_and_later_sweeps_read_none_of_its_files(settings, rucio):
    t0 = rucio.created[("lst", NAMES[0])]
    finished_night(settings, rucio, t0)
    assert rucio.meta[("lst", "LST1_20261124_raw")][marks.FINISHED] == 3
    rucio.calls.clear()
    assert sweep(settings, rucio, Broker(), Options(), ["lst1-raw"], now=t0 + timedelta(days=3)) == []
    assert {op: rucio.calls[op] for op in READS} == {"content": 0, "marks": 0, "replicas": 0, "rules_of": 0,
                                                     "list_files": 1}
    full = sweep(settings, rucio, Broker(), Options(full=True), ["lst1-raw"], now=t0 + timedelta(days=3))
    assert full == [] and rucio.calls["marks"] == 1, "--full reads every file again, and finds nothing to do"


def test_status_counts_a_finished_dataset_from_its_mark(settings, rucio, monkeypatch):
    monkeypatch.setattr(status, "dead_lettered", lambda s: {})
    monkeypatch.setattr(status, "queue_depths", lambda s: {})
    t0 = rucio.created[("lst", NAMES[0])]
    finished_night(settings, rucio, t0)
    rucio.clock = lambda: t0 + timedelta(days=3)
    for d in list(rucio.created):
        rucio.created[d] -= timedelta(days=3)
    rucio.calls.clear()
    data = status.collect(settings, rucio, ["lst1-raw"])
    counts = data["streams"]["lst1-raw"]["lst:LST1_20261124_raw"]
    assert (counts["registered"], counts["archived"]) == (3, 3) and rucio.calls["replicas"] == 0
    assert status.collect(settings, rucio, ["lst1-raw"], full=True)["streams"] == data["streams"]
    assert status.collect(settings, rucio, ["lst1-raw"], night="20261125")["streams"]["lst1-raw"] == {}
    later = datetime.now(UTC) + timedelta(days=1)
    assert status.collect(settings, rucio, ["lst1-raw"], since=later)["streams"]["lst1-raw"] == {}


def late_file(settings, rucio, name, when):
    """A file of the night ingested at `when`, after the night's dataset was marked finished."""
    rucio.clock = lambda: when
    ingest([FileClosed.create(site="ORM", instrument="LST1", path=name, size=9, adler32="00000009",
                              night="20261124")], rucio, settings)


def test_a_late_file_attached_to_a_finished_dataset_opens_it_again_until_it_is_announced(settings, rucio):
    t0 = rucio.created[("lst", NAMES[0])]
    finished_night(settings, rucio, t0)
    late = "/data/lst1/20261124/run09999.fits.fz"
    late_file(settings, rucio, late, t0 + timedelta(days=3))
    assert rucio.created[("lst", late)] - rucio.created[("lst", "LST1_20261124_raw")] > timedelta(days=2)
    archived(rucio, late)
    found = sweep(settings, rucio, Broker(), Options(), ["lst1-raw"], now=t0 + timedelta(days=3))
    assert [(f.action, f.kind, f.subject) for f in found] == [("done", "release-source", f"lst:{late}")]
    assert rucio.meta[("lst", "LST1_20261124_raw")][marks.FINISHED] is None, "open again"
    rucio.reap(SRC)
    for grace in (LATER, LATER):
        sweep(settings, rucio, Broker(), Options(grace=grace), ["lst1-raw"], now=t0 + timedelta(days=3))
    assert rucio.meta[("lst", "LST1_20261124_raw")][marks.FINISHED] == 4


def test_an_unattached_file_stays_in_view_after_the_window_and_blocks_its_dataset(settings, rucio):
    t0 = rucio.created[("lst", NAMES[0])]
    legacy(rucio, NAMES[2])
    archived(rucio, *NAMES[:2])
    assert ("report", "not-attached", NAMES[2]) in run(settings, rucio)
    assert rucio.meta[("lst", "LST1_20261124_raw")][marks.UNATTACHED] == [NAMES[2]]
    rucio.reap(SRC)
    for _ in range(2):  # its neighbours announced; the dataset is not finished while NAMES[2] is unattached
        found = sweep(settings, rucio, Broker(), Options(grace=LATER), ["lst1-raw"], now=t0 + timedelta(days=5))
        assert ("report", "not-attached", f"lst:{NAMES[2]}") in [(f.action, f.kind, f.subject) for f in found]
    assert rucio.meta[("lst", "LST1_20261124_raw")].get(marks.FINISHED) is None
    found = sweep(settings, rucio, Broker(), Options(fix=True), ["lst1-raw"], now=t0 + timedelta(days=5))
    assert [(f.action, f.kind) for f in found] == [("done", "not-attached")]
    sweep(settings, rucio, Broker(), Options(), ["lst1-raw"], now=t0 + timedelta(days=5))
    assert rucio.meta[("lst", "LST1_20261124_raw")][marks.UNATTACHED] is None


def test_an_unattached_file_no_sweep_saw_within_the_window_is_found_by_full(settings, rucio):
    t0 = rucio.created[("lst", NAMES[0])]
    legacy(rucio, NAMES[2])
    later = t0 + timedelta(days=2)
    assert sweep(settings, rucio, Broker(), Options(dry_run=True), ["lst1-raw"], now=later) == []
    found = sweep(settings, rucio, Broker(), Options(full=True), ["lst1-raw"], now=later)
    assert [(f.kind, f.subject) for f in found] == [("not-attached", f"lst:{NAMES[2]}")]


def test_a_dry_run_marks_nothing(settings, rucio):
    archived(rucio, *NAMES)
    sweep(settings, rucio, Broker(), Options(), ["lst1-raw"])
    rucio.reap(SRC)
    for _ in range(2):
        sweep(settings, rucio, Broker(), Options(grace=LATER, dry_run=True), ["lst1-raw"])
    assert marks.FINISHED not in rucio.meta.get(("lst", "LST1_20261124_raw"), {})


def test_a_stream_that_keeps_its_sources_finishes_a_dataset_once_every_archive_is_verified(rucio):
    s = parse({"streams": [dict(STREAMS["streams"][0], release_source=False)]})
    archived(rucio, *NAMES[:2])
    sweep(s, rucio, Broker(), Options(), ["lst1-raw"])
    assert rucio.meta.get(("lst", "LST1_20261124_raw"), {}).get(marks.FINISHED) is None
    archived(rucio, NAMES[2])
    sweep(s, rucio, Broker(), Options(), ["lst1-raw"])
    assert rucio.meta[("lst", "LST1_20261124_raw")][marks.FINISHED] == 3 and not rucio.tombstoned


def test_a_file_attached_to_a_dataset_finished_within_the_window_opens_it_again(settings, rucio):
    t0 = rucio.created[("lst", NAMES[0])]
    finished_night(settings, rucio, t0)
    late = "/data/lst1/20261124/run09998.fits.fz"
    late_file(settings, rucio, late, t0 + timedelta(hours=3))
    archived(rucio, late)
    found = sweep(settings, rucio, Broker(), Options(), ["lst1-raw"], now=t0 + timedelta(hours=4))
    assert [(f.action, f.kind, f.subject) for f in found] == [("done", "release-source", f"lst:{late}")]


def test_a_file_in_no_dataset_with_nothing_recorded_on_it_is_named_and_left_to_a_person(settings, rucio):
    """Ingest never leaves one (registration and attachment are one call); someone else may have."""
    rucio.datasets[("lst", "LST1_20261124_raw")].discard(("lst", NAMES[2]))
    for options in (Options(fix=True), Options(fix=True, full=True)):
        found = sweep(settings, rucio, Broker(), options, ["lst1-raw"])
        (f,) = [f for f in found if f.subject == f"lst:{NAMES[2]}"]
        assert (f.kind, f.action) == ("not-attached", "report") and "replay it" in f.detail
    assert ("lst", NAMES[2]) not in rucio.datasets[("lst", "LST1_20261124_raw")]
    assert rucio.meta.get(("lst", "LST1_20261124_raw"), {}).get(marks.FINISHED) is None


def test_files_without_marks_are_announced_with_the_path_their_name_holds(settings, rucio):
    archived(rucio, NAMES[0])
    sweep(settings, rucio, Broker(), Options(), ["lst1-raw"])
    rucio.reap(SRC)
    broker = Broker()
    sweep(settings, rucio, broker, Options(grace=LATER), ["lst1-raw"], now=datetime.now(UTC) + timedelta(hours=2))
    (msg,) = broker.messages
    assert decode_file_archived(msg.body).path == NAMES[0] and marks.PATH not in rucio.meta[("lst", NAMES[0])]


def test_a_lost_announcement_of_a_file_rucio_holds_no_adler32_for_is_reported_not_published(settings, rucio):
    from injector.gateway import FileMeta

    archived(rucio, NAMES[0])
    broker = Broker()
    run(settings, rucio, broker)
    rucio.reap(SRC)
    rucio.files[("lst", NAMES[0])] = FileMeta("lst", NAMES[0], 100, None)
    assert run(settings, rucio, broker, grace=LATER) == [("report", "announce-archived", NAMES[0])]
    assert broker.messages == [] and not rucio.meta[("lst", NAMES[0])].get(marks.ANNOUNCED)
