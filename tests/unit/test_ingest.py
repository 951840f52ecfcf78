import random

import pytest

from consumers.ingest import DatasetMemo, ingest
from injector import marks
from injector.config import parse
from injector.errors import InvalidEvent, RucioRefused
from injector.events import FileClosed
from injector.gateway import FileMeta
from injector.testing import FakeRucio, Unavailable
from tests.conftest import STREAMS


def ev(n=1, **over):
    f = dict(site="ORM", instrument="LST1", path=f"/data/lst1/run{n:05d}.fits.fz", size=100 + n,
             adler32=f"{n:08x}", night="20261124")
    f.update(over)
    return FileClosed.create(**f)


@pytest.fixture
def rucio():
    return FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})


def kinds(outcomes):
    return [(o.kind, o.label) for o in outcomes]


def test_new_file_is_registered_in_place_attached_and_its_dataset_gets_the_rules(settings, rucio):
    out = ingest([ev(1)], rucio, settings)
    assert kinds(out) == [("done", "registered")]
    assert rucio.pfns[("ORM-BUFFER", "lst", "/data/lst1/run00001.fits.fz")] == (
        "file://localhost/data/lst1/run00001.fits.fz")
    assert rucio.datasets[("lst", "LST1_20261124_raw")] == {("lst", "/data/lst1/run00001.fits.fz")}
    assert [(r.rse_expression, r.copies, r.activity) for r in rucio.rules] == [("PIC-ARCHIVE", 1, "T0 Export")]


def test_a_batch_makes_one_bulk_call_per_step(settings, rucio):
    ingest([ev(i) for i in range(1, 501)], rucio, settings)
    assert rucio.calls["register"] == 1 and rucio.calls["add_dataset"] == 1 and rucio.calls["file_metadata"] == 1
    assert rucio.calls["attach"] == rucio.calls["mark"] == 0, "registered and attached in one call, nothing after"
    assert len(rucio.pfns) == 500


def test_more_than_a_thousand_files_are_split_into_bulk_calls_of_at_most_a_thousand(settings, rucio):
    ingest([ev(i) for i in range(1, 2502)], rucio, settings)
    assert rucio.calls["register"] == 3
    assert len(rucio.datasets[("lst", "LST1_20261124_raw")]) == 2501


def test_same_event_three_times_gives_one_replica_one_attachment_one_rule_set(settings, rucio):
    e = ev(7)
    out = ingest([e, e], rucio, settings) + ingest([e], rucio, settings)
    assert kinds(out) == [("done", "registered"), ("done", "already-registered"), ("done", "already-registered")]
    assert len(rucio.pfns) == 1 and len(rucio.rules) == 1
    assert len(rucio.datasets[("lst", "LST1_20261124_raw")]) == 1


def test_same_file_in_two_different_events_is_one_replica(settings, rucio):
    a, b = ev(3), ev(3)
    assert a.event_id != b.event_id
    ingest([a], rucio, settings, DatasetMemo())
    assert kinds(ingest([b], rucio, settings, DatasetMemo())) == [("done", "already-registered")]
    assert len(rucio.pfns) == 1 and len(rucio.rules) == 1


def test_reordered_events_end_in_the_same_state(settings):
    events = [ev(i, night=f"2026112{i % 3}") for i in range(1, 40)]
    states = []
    for seed in (1, 2):
        r = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        for i in range(0, len(shuffled), 7):
            ingest(shuffled[i : i + 7], r, settings)
        states.append((r.pfns, r.datasets, sorted((x.name, x.rse_expression) for x in r.rules)))
    assert states[0] == states[1]


def test_same_name_with_other_adler32_than_rucio_holds_is_a_conflict_and_nothing_is_overwritten(settings, rucio):
    ingest([ev(5)], rucio, settings)
    out = ingest([ev(5, adler32="deadbeef")], rucio, settings)
    assert kinds(out) == [("dead-letter", "checksum-conflict")]
    assert "adler32 00000005" in out[0].error and "deadbeef" in out[0].error
    assert rucio.files[("lst", "/data/lst1/run00005.fits.fz")].adler32 == "00000005"


def test_same_name_twice_in_one_batch_with_other_size_dead_letters_only_the_second(settings, rucio):
    out = ingest([ev(5), ev(5, size=1)], rucio, settings)
    assert kinds(out) == [("done", "registered"), ("dead-letter", "checksum-conflict")]


def test_one_bad_event_does_not_fail_its_good_neighbours(settings, rucio):
    bad = InvalidEvent("size: bad")
    events = [ev(1), bad, ev(2, instrument="LST9"), ev(3, path="/etc/passwd"), ev(4, night=None), ev(5)]
    out = ingest(events, rucio, settings)
    assert kinds(out) == [("done", "registered"), ("dead-letter", "invalid-event"), ("dead-letter", "no-stream"),
                          ("dead-letter", "path-outside-root"), ("dead-letter", "template-field-missing"),
                          ("done", "registered")]


def test_a_file_rucio_refuses_is_isolated_by_bisection(settings):
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/lst1/run0000"})
    events = [ev(i) for i in range(1, 16)]  # run00010..15 are not under the accepted prefix
    out = ingest(events, rucio, settings)
    assert [o.kind for o in out] == ["done"] * 9 + ["dead-letter"] * 6
    assert all("RSEFileNameNotSupported" in o.error for o in out[9:])
    assert len(rucio.datasets[("lst", "LST1_20261124_raw")]) == 9


def test_unknown_scope_dead_letters_as_rucio_refused(settings, rucio):
    rucio.scopes.discard("lst")
    out = ingest([ev(1)], rucio, settings)
    assert kinds(out) == [("dead-letter", "rucio-refused")] and "ScopeNotFound" in out[0].error


def test_permission_denied_is_its_own_reason(settings, rucio):
    rucio.denied_scopes.add("lst")
    assert kinds(ingest([ev(1)], rucio, settings)) == [("dead-letter", "permission-denied")]


def test_rucio_outage_asks_for_a_retry_and_leaves_other_datasets_alone(settings, rucio):
    rucio.fail("add_dataset", Unavailable("503"), times=1)
    out = ingest([ev(1, night="20261124"), ev(2, night="20261125")], rucio, settings)
    assert [o.kind for o in out] == ["retry", "done"]
    # nothing was registered without its dataset; the retried event completes later, without a second rule
    assert ("lst", "/data/lst1/run00001.fits.fz") not in rucio.files
    assert kinds(ingest([ev(1, night="20261124")], rucio, settings)) == [("done", "registered")]
    assert len(rucio.rules) == 2


def test_rucio_unavailable_during_registration_retries_the_whole_batch(settings, rucio):
    rucio.fail("register", Unavailable("connection refused"))
    assert [o.kind for o in ingest([ev(1), ev(2)], rucio, settings)] == ["retry", "retry"]


def test_dataset_created_without_rules_elsewhere_gets_the_missing_rule(settings, rucio):
    rucio.datasets[("lst", "LST1_20261124_raw")] = set()
    ingest([ev(1)], rucio, settings)
    assert [(r.name, r.rse_expression) for r in rucio.rules] == [("LST1_20261124_raw", "PIC-ARCHIVE")]


DS = ("lst", "LST1_20261124_raw")


def rolling(settings):
    """The settings with on_closed_dataset = "next" on the LST1 stream."""
    data = {"streams": [dict(STREAMS["streams"][0], on_closed_dataset="next"), STREAMS["streams"][1]]}
    return parse(data)


def test_a_closed_dataset_dead_letters_its_new_files_as_dataset_closed_and_registers_nothing(settings, rucio):
    ingest([ev(1)], rucio, settings)
    rucio.closed.add(DS)
    out = ingest([ev(2), ev(3)], rucio, settings)
    assert kinds(out) == [("dead-letter", "dataset-closed")] * 2
    assert "lst:/data/lst1/run00002.fits.fz" in out[0].error and "lst:LST1_20261124_raw is closed" in out[0].error
    assert ("lst", "/data/lst1/run00002.fits.fz") not in rucio.files and rucio.calls["register"] == 1


def test_datasets_are_checked_once_per_batch_not_per_file_and_again_every_batch(settings, rucio):
    ingest([ev(i, night=f"2026112{i % 2}") for i in range(1, 501)], rucio, settings)
    assert rucio.calls["datasets_open"] == 1
    rucio.closed.add(("lst", "LST1_20261121_raw"))  # ops close one between two batches
    out = ingest([ev(i, night=f"2026112{i % 2}") for i in range(501, 511)], rucio, settings)
    assert rucio.calls["datasets_open"] == 2
    assert sorted({o.label for o in out}) == ["dataset-closed", "registered"]


def test_a_redelivered_file_already_attached_to_its_closed_dataset_is_done_not_dead_lettered(settings, rucio):
    e = ev(1)
    ingest([e], rucio, settings)
    rucio.closed.add(DS)
    assert kinds(ingest([e], rucio, settings)) == [("done", "already-registered")]
    assert rucio.calls["register"] == 1


def test_a_registered_file_never_attached_to_its_now_closed_dataset_is_dead_lettered(settings, rucio):
    ingest([ev(1)], rucio, settings)
    rucio.datasets[DS].clear()  # an orphan from before the check existed
    rucio.closed.add(DS)
    out = ingest([ev(1)], rucio, settings)
    assert kinds(out) == [("dead-letter", "dataset-closed")]


def test_with_next_files_go_to_the_first_open_or_absent_successor_created_with_the_rules(settings, rucio):
    s = rolling(settings)
    ingest([ev(1)], rucio, s)
    rucio.datasets[("lst", "LST1_20261124_raw.2")] = set()
    rucio.closed |= {DS, ("lst", "LST1_20261124_raw.2")}
    out = ingest([ev(2), ev(3)], rucio, s)
    assert kinds(out) == [("done", "registered")] * 2
    assert rucio.datasets[("lst", "LST1_20261124_raw.3")] == {("lst", "/data/lst1/run00002.fits.fz"),
                                                               ("lst", "/data/lst1/run00003.fits.fz")}
    assert ("LST1_20261124_raw.3", "PIC-ARCHIVE") in [(r.name, r.rse_expression) for r in rucio.rules]
    assert rucio.calls["mark"] == 0, "new files need no mark: their dataset holds them"


def test_with_next_a_file_already_attached_along_the_chain_is_not_attached_again(settings, rucio):
    s = rolling(settings)
    rucio.datasets[DS] = set()
    rucio.closed.add(DS)
    e = ev(1)
    assert kinds(ingest([e], rucio, s)) == [("done", "registered")]  # to .2
    rucio.closed.add(("lst", "LST1_20261124_raw.2"))
    assert kinds(ingest([e], rucio, s)) == [("done", "already-registered")]
    assert ("lst", "LST1_20261124_raw.3") not in rucio.datasets


def test_with_next_an_earlier_orphan_rolls_on_and_its_recorded_dataset_follows(settings, rucio):
    s = rolling(settings)
    ingest([ev(1)], rucio, s)
    rucio.datasets[DS].clear()
    rucio.closed.add(DS)
    assert kinds(ingest([ev(1)], rucio, s)) == [("done", "already-registered")]
    assert rucio.datasets[("lst", "LST1_20261124_raw.2")] == {("lst", "/data/lst1/run00001.fits.fz")}
    assert rucio.meta[("lst", "/data/lst1/run00001.fits.fz")][marks.DATASET] == "lst:LST1_20261124_raw.2"


class ClosingRucio(FakeRucio):
    """Ops close the dataset after the batch checked it, before it registers."""

    def add_dataset(self, scope, name, rules):  # type: ignore[no-untyped-def]
        created = super().add_dataset(scope, name, rules)
        self.closed.add(DS)
        return created


def test_a_dataset_closed_between_the_check_and_the_registration_registers_nothing_and_names_file_and_dataset(
        settings):
    rucio = ClosingRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    out = ingest([ev(1), ev(2, night="20261125")], rucio, settings)
    assert kinds(out) == [("dead-letter", "dataset-closed"), ("done", "registered")]
    assert "lst:/data/lst1/run00001.fits.fz: dataset lst:LST1_20261124_raw was closed" in out[0].error
    assert "not registered" in out[0].error and ("lst", "/data/lst1/run00001.fits.fz") not in rucio.files
    assert rucio.calls["register"] <= 3, "the closed dataset is recognised, not bisected file by file"


def test_dataset_memo_saves_the_dataset_call_on_later_batches(settings, rucio):
    memo = DatasetMemo()
    ingest([ev(1)], rucio, settings, memo)
    ingest([ev(2)], rucio, settings, memo)
    assert rucio.calls["add_dataset"] == 1


def test_rucio_exceptions_map_onto_the_error_tree():
    from rucio.common import exception as rx

    from injector.errors import ChecksumConflict, PermissionDenied, RucioRefused, RucioUnavailable
    from injector.gateway import classify

    assert isinstance(classify(rx.FileConsistencyMismatch("x")), ChecksumConflict)
    assert isinstance(classify(rx.AccessDenied("x")), PermissionDenied)
    assert isinstance(classify(rx.RSENotFound("x")), RucioRefused)
    assert isinstance(classify(rx.DatabaseException("x")), RucioUnavailable)
    assert isinstance(classify(rx.DataIdentifierAlreadyExists("x")), RucioUnavailable)  # a race: retry
    assert isinstance(classify(ConnectionRefusedError()), RucioUnavailable)


NAME = "lst:/data/lst1/run00001.fits.fz"


def test_every_outcome_names_the_did_of_its_file(settings, rucio):
    first = ingest([ev(1), ev(1), ev(1, size=5)], rucio, settings)
    again = ingest([ev(1)], rucio, settings)
    assert [(o.label, o.did) for o in first + again] == [
        ("registered", NAME), ("already-registered", NAME), ("checksum-conflict", NAME), ("already-registered", NAME)]


class RivalRucio(FakeRucio):
    """Another ingest process registers the same names with other bytes just before this one registers."""

    def register(self, registrations):  # type: ignore[no-untyped-def]
        for r in (r for g in registrations for r in g.replicas):
            self.files.setdefault((r.scope, r.name), FileMeta(r.scope, r.name, r.bytes, "0badc0de"))
        super().register(registrations)


def test_other_bytes_registered_by_a_rival_between_the_check_and_the_registration_are_a_conflict(settings):
    rucio = RivalRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    (out,) = ingest([ev(1)], rucio, settings)
    assert (out.kind, out.label, out.did) == ("dead-letter", "checksum-conflict", NAME)
    assert "0badc0de" in out.error and rucio.datasets.get(("lst", "LST1_20261124_raw"), set()) == set()
    assert ("ORM-BUFFER", "lst", "/data/lst1/run00001.fits.fz") not in rucio.pfns, "one transaction: nothing added"


def test_when_rucio_cannot_say_whether_datasets_are_open_nothing_is_registered_and_all_retry(settings, rucio):
    rucio.fail("datasets_open", Unavailable("503"))
    out = ingest([ev(1), ev(2, night="20261125")], rucio, settings)
    assert [o.kind for o in out] == ["retry", "retry"] and all("503" in o.error for o in out)
    assert rucio.calls["register"] == 0


def test_a_dataset_that_already_has_its_rule_gets_no_second_one(settings, rucio):
    ingest([ev(1)], rucio, settings)
    ingest([ev(2)], rucio, settings)  # a new memo: the dataset exists, its rules are read
    assert rucio.calls["dataset_rules"] == 1 and rucio.calls["add_rule"] == 0 and len(rucio.rules) == 1


def test_a_transient_registration_failure_retries_every_file_of_the_call(settings, rucio):
    rucio.fail("register", Unavailable("connection reset"))
    out = ingest([ev(1), ev(2), ev(3, night="20261125")], rucio, settings)
    assert [o.kind for o in out] == ["retry"] * 3 and rucio.calls["register"] == 1


class RecordingRucio(FakeRucio):
    def register(self, registrations):  # type: ignore[no-untyped-def]
        self.sent = [r for g in registrations for r in g.replicas]
        super().register(registrations)


def test_the_replica_is_registered_with_the_events_md5_and_no_per_file_metadata(settings):
    rucio = RecordingRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    ingest([ev(1, md5="0123456789abcdef0123456789abcdef")], rucio, settings)
    (r,) = rucio.sent
    assert r.md5 == "0123456789abcdef0123456789abcdef" and r.meta == ()
    assert rucio.meta == {}, "the stream follows from the dataset, the path from the name"


def test_only_what_the_name_cannot_tell_is_recorded_on_the_file(settings):
    """A stream whose names another stream can share records its name; a basename stream records the path."""
    twin = dict(STREAMS["streams"][0], name="lst1-dl1", datatype="dl1")
    raw = dict(STREAMS["streams"][0], datatype="raw")
    base = dict(STREAMS["streams"][1], did_name="basename")
    s = parse({"streams": [raw, twin, base]})
    rucio = RecordingRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    ingest([ev(1, datatype="raw")], rucio, s)
    assert dict(rucio.sent[0].meta) == {marks.STREAM: "lst1-raw"}
    ingest([ev(2, instrument="MAGIC", path="/data/magic/x/M1_0002.root", datatype="raw")],
           rucio, s)
    assert dict(rucio.sent[0].meta) == {marks.PATH: "/data/magic/x/M1_0002.root"}


def test_a_file_rucio_holds_already_is_registered_without_its_md5(settings, rucio):
    """Rucio compares an md5 sent with the one it holds (none, for a file registered without one)."""
    ingest([ev(1)], rucio, settings)
    rucio.datasets[DS].clear()
    recording = RecordingRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    recording.files, recording.datasets, recording.pfns = rucio.files, rucio.datasets, rucio.pfns
    ingest([ev(1, md5="0123456789abcdef0123456789abcdef")], recording, settings, DatasetMemo())
    assert recording.sent[0].md5 is None and ("lst", "/data/lst1/run00001.fits.fz") in rucio.datasets[DS]


def test_the_dataset_memo_forgets_the_oldest_beyond_its_limit():
    memo = DatasetMemo(limit=2)
    for key in (("lst", "a"), ("lst", "b"), ("lst", "c")):
        memo.add(key)
    assert ("lst", "a") not in memo and ("lst", "b") in memo and ("lst", "c") in memo


class RefusingAttach(FakeRucio):
    """Rucio refuses to register one particular file (its whole bulk call fails)."""

    def register(self, registrations):  # type: ignore[no-untyped-def]
        if any(r.name == "/data/lst1/run00002.fits.fz" for g in registrations for r in g.replicas):
            self._enter("register")
            raise RucioRefused("UnsupportedOperation: that file cannot be attached (test)")
        super().register(registrations)


def test_a_file_rucio_refuses_is_isolated_and_its_neighbours_are_registered(settings):
    rucio = RefusingAttach(rses={"ORM-BUFFER": "file://localhost/data/"})
    out = ingest([ev(1), ev(2), ev(3)], rucio, settings)
    assert kinds(out) == [("done", "registered"), ("dead-letter", "rucio-refused"), ("done", "registered")]
    assert rucio.datasets[("lst", "LST1_20261124_raw")] == {("lst", "/data/lst1/run00001.fits.fz"),
                                                            ("lst", "/data/lst1/run00003.fits.fz")}


@pytest.mark.parametrize(("first", "second", "calls"), [(500, 500, 1), (600, 500, 2), (1000, 1, 2)])
def test_files_of_several_datasets_share_a_call_up_to_the_bulk_limit(settings, rucio, first, second, calls):
    events = [ev(i) for i in range(first)] + [ev(5000 + i, night="20261125") for i in range(second)]
    ingest(events, rucio, settings)
    assert rucio.calls["register"] == calls
    assert len(rucio.datasets[("lst", "LST1_20261124_raw")]) == first


def test_a_late_duplicate_of_a_file_whose_source_was_released_and_reaped_never_registers_the_source_again(
        settings, rucio):
    e = ev(3)
    source = ("ORM-BUFFER", "lst", e.path)
    assert kinds(ingest([e], rucio, settings)) == [("done", "registered")]
    rucio.add_replica("PIC-ARCHIVE", "lst", e.path)  # archived,
    rucio.tombstoned.add(source)  # released,
    rucio.reap("ORM-BUFFER")  # and deleted by the reaper: its bytes are gone from the buffer
    assert kinds(ingest([e, FileClosed.create(**e.model_dump(exclude={"event_id", "schema_"}))], rucio,
                        settings)) == [("done", "source-gone")] * 2
    assert source not in rucio.pfns, "a source replica over deleted bytes"


class ReapingRucio(FakeRucio):
    """The reaper deletes the released source right after ingest looked for it (before the registration)."""

    def datasets_open(self, dids):  # type: ignore[no-untyped-def]
        self.reap("ORM-BUFFER")
        return super().datasets_open(dids)


def test_a_duplicate_racing_the_reaper_never_puts_the_deleted_source_back(settings):
    rucio = ReapingRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    e = ev(4)
    source = ("ORM-BUFFER", "lst", e.path)
    ingest([e], rucio, settings)
    rucio.add_replica("PIC-ARCHIVE", "lst", e.path)
    rucio.tombstoned.add(source)  # released; the reaper deletes it while the duplicate is in flight
    assert kinds(ingest([e], rucio, settings, DatasetMemo())) == [("done", "already-registered")]
    assert source not in rucio.pfns, "a file Rucio held is attached only, never registered again"
