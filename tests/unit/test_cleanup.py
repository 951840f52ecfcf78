import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from consumers.cleanup import cleanup, release, verify
from consumers.ingest import ingest
from injector import marks
from injector.config import parse
from injector.events import FileClosed, RucioEvent, archived_event_id, decode_file_archived
from injector.gateway import FileMeta
from injector.testing import FakeRucio, Unavailable
from tests.conftest import STREAMS

SRC, DST = "ORM-BUFFER", "PIC-ARCHIVE"
NAME = "/data/lst1/run00001.fits.fz"


@pytest.fixture
def rucio(settings):
    r = FakeRucio(rses={SRC: "file://localhost/data/"})
    ingest([FileClosed.create(site="ORM", instrument="LST1", path=NAME, size=101, adler32="00000001",
                              night="20261124")], r, settings)
    return r


def hermes(event_type, **payload):
    payload.setdefault("scope", "lst")
    payload.setdefault("name", NAME)
    return RucioEvent(event_type=event_type, payload=payload, created_at="2026-11-25 01:02:03.456789")


def done(**kw):
    return hermes("transfer-done", **{"src-rse": SRC, "dst-rse": DST, "checksum-adler": "00000001", **kw})


def deleted():
    return hermes("deletion-done", rse=SRC, url="file://localhost" + NAME)


def labels(outs):
    return [o.label for o in outs]


def test_transfer_done_with_the_archive_copy_available_releases_the_source(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    assert labels(cleanup([done()], rucio, settings)) == ["released"]
    assert rucio.tombstoned == {(SRC, "lst", NAME)}


def test_transfer_done_whose_destination_is_not_yet_available_does_not_release(settings, rucio):
    rucio.add_replica(DST, "lst", NAME, state="COPYING")
    assert labels(cleanup([done()], rucio, settings)) == ["not-yet-safe"]
    assert not rucio.tombstoned


def test_transfer_done_without_any_destination_replica_does_not_release(settings, rucio):
    assert labels(cleanup([done()], rucio, settings)) == ["not-yet-safe"] and not rucio.tombstoned


def test_transfer_done_reporting_another_checksum_keeps_the_source_and_dead_letters(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    (out,) = cleanup([done(**{"checksum-adler": "deadbeef"})], rucio, settings)
    assert (out.kind, out.reason) == ("dead-letter", "checksum-mismatch") and not rucio.tombstoned


def test_every_rule_must_be_satisfied_before_release(rucio):
    two = json.loads(json.dumps(STREAMS))
    two["streams"][0]["rules"] = [{"rse_expression": "PIC-ARCHIVE"}, {"rse_expression": "T1S", "copies": 2}]
    s = parse(two)
    rucio.expressions["T1S"] = {"CNAF", "DESY", "INFN"}
    rucio.add_replica(DST, "lst", NAME)
    rucio.add_replica("CNAF", "lst", NAME)
    assert labels(cleanup([done()], rucio, s)) == ["not-yet-safe"]
    rucio.add_replica("DESY", "lst", NAME)
    assert labels(cleanup([done()], rucio, s)) == ["released"]


def test_a_stream_that_keeps_its_source_never_releases(rucio):
    keep = json.loads(json.dumps(STREAMS))
    keep["streams"][0]["release_source"] = False
    rucio.add_replica(DST, "lst", NAME)
    assert labels(cleanup([done()], rucio, parse(keep))) == ["source-kept"] and not rucio.tombstoned


def test_deletion_done_at_the_source_announces_file_archived(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    cleanup([done()], rucio, settings)
    rucio.reap(SRC)
    (out,) = cleanup([deleted()], rucio, settings)
    assert out.label == "archived"
    (msg,) = out.emit
    ev = decode_file_archived(msg.body)
    assert msg.routing_key == "file.archived.ORM.LST1" and msg.exchange == settings.broker.daq_exchange
    assert (ev.path, ev.size, ev.adler32, ev.scope, ev.name) == (NAME, 101, "00000001", "lst", NAME)
    assert ev.destinations == [DST] and ev.event_id == archived_event_id("lst", NAME)


def test_duplicate_deletion_done_produces_the_identical_announcement(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    rucio.reap(SRC) if cleanup([done()], rucio, settings) else None
    a, b = cleanup([deleted(), deleted()], rucio, settings)
    assert a.emit[0].body == b.emit[0].body and a.emit[0].message_id == b.emit[0].message_id


def test_deletion_done_without_a_safe_archive_copy_is_never_announced_as_archived(settings, rucio):
    rucio.tombstoned.add((SRC, "lst", NAME))  # released by someone else, no archive copy
    rucio.reap(SRC)
    (out,) = cleanup([deleted()], rucio, settings)
    assert out.kind == "dead-letter" and out.reason == "source-lost" and not out.emit
    assert "not safe elsewhere" in (out.error or "")


def test_deletion_done_while_the_source_replica_still_exists_announces_nothing(settings, rucio):
    (out,) = cleanup([deleted()], rucio, settings)
    assert out.label == "source-still-present" and not out.emit


def test_events_of_other_experiments_are_acked_and_counted_not_errors(settings, rucio):
    outs = cleanup([hermes("transfer-done", scope="atlas"), hermes("rule_ok"), deleted()], rucio, settings)
    assert [o.kind for o in outs] == ["done"] * 3
    assert labels(outs)[:2] == ["unmanaged", "ignored-rule_ok"]


def failed(rid, previous=None):
    return hermes("transfer-failed", **{"dst-rse": DST, "reason": f"SRM timeout {rid}", "request-id": rid,
                                         "previous-request-id": previous})


def test_transfer_failed_never_releases_and_dead_letters_once_at_the_stream_failure_limit(settings, rucio):
    first = cleanup([failed("r1"), failed("r1"), failed("r2", "r1")], rucio, settings)
    assert labels(first) == ["transfer-failed"] * 3  # r1 twice (a duplicate) counts once
    third, fourth = cleanup([failed("r3", "r2"), failed("r4", "r3")], rucio, settings)  # a new process: same count
    assert third.kind == "dead-letter" and third.reason == "transfer-failed"
    assert NAME in third.error and all(f"SRM timeout r{i}" in third.error for i in (1, 2, 3))
    assert fourth.label == "transfer-failed-known"
    assert labels(cleanup([failed("r3", "r2")], rucio, settings)) == ["transfer-failed-known"]  # redelivered
    assert not rucio.tombstoned


def test_a_new_request_chain_after_a_dead_letter_starts_a_new_episode(settings, rucio):
    outs = cleanup([failed(r, p) for r, p in (("a1", None), ("a2", "a1"), ("a3", "a2"))], rucio, settings)
    assert [o.kind for o in outs] == ["done", "done", "dead-letter"]
    outs = cleanup([failed(r, p) for r, p in (("b1", None), ("b2", "b1"), ("b3", "b2"))], rucio, settings)
    assert [o.kind for o in outs] == ["done", "done", "dead-letter"] and "a1" not in outs[2].error


def test_deletion_failed_is_retried(settings, rucio):
    (out,) = cleanup([hermes("deletion-failed", rse=SRC, url="file://localhost" + NAME, reason="EPERM")],
                     rucio, settings)
    assert (out.kind, out.reason) == ("retry", "deletion-failed") and "EPERM" in out.error


def test_duplicated_and_shuffled_events_release_once_and_announce_one_identical_event(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    stream = [hermes("transfer-queued", **{"dst-rse": DST}), done(), done(), done()]
    random.Random(4).shuffle(stream)
    cleanup(stream, rucio, settings)
    assert rucio.calls["set_tombstones"] == 1
    rucio.reap(SRC)
    announcements = {o.emit[0].body for o in cleanup([deleted()] * 3 + [done()], rucio, settings) if o.emit}
    assert len(announcements) == 1


def test_a_locked_source_replica_is_reported_not_failed(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    rucio.locked.add((SRC, "lst", NAME))
    assert labels(cleanup([done()], rucio, settings)) == ["release-refused"]


def test_rucio_outage_retries_the_batch(settings, rucio):
    rucio.fail("replicas", Unavailable("503"))
    assert [o.kind for o in cleanup([done(), deleted()], rucio, settings)] == ["retry", "retry"]


def test_deletion_done_with_an_unreadable_created_at_is_dead_lettered_naming_file_and_field(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    cleanup([done()], rucio, settings)
    rucio.reap(SRC)
    bad = RucioEvent(event_type="deletion-done", payload=deleted().payload, created_at="25/11/2026 01:02")
    (out,) = cleanup([bad], rucio, settings)
    assert (out.kind, out.reason) == ("dead-letter", "invalid-event") and not out.emit
    assert f"deletion-done of lst:{NAME}: hermes created_at: '25/11/2026 01:02' is not a time" in out.error
    assert "injector_announced" not in rucio.marks([("lst", NAME)])[("lst", NAME)]  # the reconciler announces it


def test_transfer_done_of_a_file_another_configured_stream_ingested_is_unmanaged_not_source_gone(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    cleanup([done()], rucio, settings)
    rucio.reap(SRC)  # no source replica left: only the file's mark says which stream it is
    rucio.mark([("lst", NAME, {"injector_stream": "a-stream-added-later"})])
    assert labels(cleanup([done()], rucio, settings)) == ["unmanaged"]
    rucio.mark([("lst", NAME, {"injector_stream": settings.streams[0].name})])
    assert labels(cleanup([done()], rucio, settings)) == ["source-gone"]


DID = f"lst:{NAME}"


def test_every_outcome_names_the_did_of_its_file(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    outs = cleanup([done(), done(**{"checksum-adler": "0000beef"}), deleted()], rucio, settings)
    assert [(o.label, o.did) for o in outs] == [("released", DID), ("checksum-mismatch", DID),
                                                 ("source-still-present", DID)]


def test_an_unmanaged_event_first_in_a_batch_does_not_stop_the_others_from_being_settled(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    outs = cleanup([hermes("transfer-done", name="/data/lst1/unknown.fits"), done(**{"checksum-adler": "0000beef"}),
                    done()], rucio, settings)
    assert labels(outs) == ["unmanaged", "checksum-mismatch", "released"]
    assert rucio.tombstoned == {(SRC, "lst", NAME)}


@pytest.mark.parametrize(("held", "reported"), [("00000001", "1"), ("0000000a", "A"), ("0000000a", "0000000A")])
def test_the_reported_adler32_is_compared_without_case_or_leading_zeros(settings, held, reported):
    rucio = FakeRucio(rses={SRC: "file://localhost/data/"})
    ingest([FileClosed.create(site="ORM", instrument="LST1", path=NAME, size=101, adler32=held,
                              night="20261124")], rucio, settings)
    rucio.add_replica(DST, "lst", NAME)
    assert labels(cleanup([done(**{"checksum-adler": reported})], rucio, settings)) == ["released"]


def test_a_transient_fault_while_verifying_retries_only_that_event(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    rucio.fail("rses", Unavailable("503 on the RSE expression"))
    (out,) = cleanup([done()], rucio, settings)
    assert (out.kind, out.did) == ("retry", DID) and "503" in (out.error or "") and not rucio.tombstoned


def test_a_deletion_done_names_its_stream_by_the_url_of_the_deleted_replica(rucio):
    lst, magic = STREAMS["streams"]
    settings = parse({"streams": [lst, {**magic, "scope": "lst", "storage_root": "/data/magic"}]})
    rucio.tombstoned.add((SRC, "lst", NAME))
    rucio.reap(SRC)
    (ours,) = cleanup([deleted()], rucio, settings)
    assert ours.reason == "source-lost" and ours.did == DID
    elsewhere = hermes("deletion-done", rse=SRC, url="file://localhost/elsewhere/run00001.fits.fz")
    (other,) = cleanup([elsewhere], rucio, settings)
    assert other.label == "unmanaged"


def test_a_file_whose_size_or_adler32_rucio_lacks_is_retried_not_announced(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    rucio.tombstoned.add((SRC, "lst", NAME))
    rucio.reap(SRC)
    rucio.files[("lst", NAME)] = dataclasses.replace(rucio.files[("lst", NAME)], adler32=None)
    (out,) = cleanup([deleted()], rucio, settings)
    assert (out.kind, out.did) == ("retry", DID) and "has no size/adler32 in Rucio" in (out.error or "")
    assert not out.emit


def test_a_file_of_another_scope_at_a_managed_source_rse_and_root_is_never_released(settings, rucio):
    # A MAGIC-scope file on the shared buffer RSE but under LST1's root: neither stream holds it (scope AND root).
    other = "/data/lst1/stray.root"
    rucio.files[("magic", other)] = FileMeta("magic", other, 5, "00000005")
    rucio.add_replica(SRC, "magic", other, pfn=f"file://localhost{other}")
    rucio.add_replica(DST, "magic", other)
    (out,) = cleanup([hermes("transfer-done", scope="magic", name=other, **{"dst-rse": DST})], rucio, settings)
    assert out.label == "unmanaged" and not rucio.tombstoned


def test_a_duplicate_transfer_failed_counts_nothing_and_writes_no_mark(settings, rucio):
    cleanup([failed("r1")], rucio, settings)
    writes = rucio.calls["mark"]
    assert labels(cleanup([failed("r1")], rucio, settings)) == ["transfer-failed"]
    assert rucio.calls["mark"] == writes


def test_verify_judges_the_archive_safe_only_when_every_rule_has_an_available_copy_away_from_the_source(
        settings, rucio):
    stream = settings.streams[0]
    did = ("lst", NAME)
    assert not verify(stream, rucio.replicas([did])[did], rucio).safe, "only the source holds it"
    rucio.add_replica(DST, "lst", NAME, state="COPYING")
    verdict = verify(stream, rucio.replicas([did])[did], rucio)
    assert not verdict.safe and "PIC-ARCHIVE has 0/1 AVAILABLE" in str(verdict)
    rucio.states[(DST, "lst", NAME)] = "AVAILABLE"
    assert verify(stream, rucio.replicas([did])[did], rucio).safe
    assert str(verify(stream, None, rucio)) == "no replica left at all"


def test_release_tombstones_the_source_and_notes_when(settings, rucio):
    assert release(rucio, [("lst", NAME, SRC)]) == {}
    assert rucio.tombstoned == {(SRC, "lst", NAME)}
    noted = datetime.fromisoformat(rucio.meta[("lst", NAME)][marks.RELEASED_AT])
    assert noted.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - noted) < timedelta(minutes=1), noted


def test_an_event_type_rucio_never_sends_is_counted_under_one_label_not_its_own(settings):
    odd = [RucioEvent(event_type=t, payload={"scope": "lst", "name": "/x"})
           for t in ("rule_ok", "transfer-submitted", "x" * 500, "ünïcødé", "transfer-done-ish")]
    outs = cleanup(odd, FakeRucio(), settings)
    assert labels(outs) == ["ignored-rule_ok", "ignored-transfer-submitted"] + ["ignored-other"] * 3


def test_a_did_rucio_refuses_to_read_fails_only_its_own_event_not_the_batch(settings):
    from injector.errors import RucioRefused

    class Refusing(FakeRucio):
        def replicas(self, dids):  # type: ignore[no-untyped-def]
            if ("lst", "/data/lst1/refused.fits") in dids:
                raise RucioRefused("Provided object does not match schema")
            return super().replicas(dids)

    events = [RucioEvent(event_type="transfer-done", payload={"scope": "lst", "name": n})
              for n in ("/data/lst1/a.fits", "/data/lst1/refused.fits", "/data/lst1/b.fits", "", "/x\n")]
    outs = cleanup(events, Refusing(), settings)
    assert [o.kind for o in outs] == ["done", "dead-letter", "done", "done", "done"]
    assert labels(outs)[3:] == ["unmanaged", "unmanaged"], "not a DID name: never asked of Rucio"


def test_a_source_deleted_between_the_read_and_the_release_is_source_gone_not_a_refusal(settings, rucio):
    rucio.add_replica(DST, "lst", NAME)
    tombstone = rucio.set_tombstones

    def reaped_first(replicas):  # type: ignore[no-untyped-def]
        rucio.pfns.pop((SRC, "lst", NAME))  # the reaper (after a released duplicate) won the race
        rucio.states.pop((SRC, "lst", NAME), None)
        tombstone(replicas)

    rucio.set_tombstones = reaped_first
    assert labels(cleanup([done()], rucio, settings)) == ["source-gone"]
