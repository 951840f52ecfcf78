"""Timestamps on the real services: hermes' created_at, whatever its form, becomes the right archived_at."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from injector import clock, topology
from injector.events import decode_file_archived
from tests.integration.conftest import ARCHIVE, SOURCE
from tests.integration.hermes import HermesSender
from tests.integration.rabbit import declared, get_all, ingested, wait_for
from tests.integration.test_cleanup_rucio import (
    RABBIT_STOMP,
    cleanup_running,
    cleanup_settings,
    outcomes,
    transfer_done,
)
from tests.integration.test_ingest_rucio import files

pytestmark = pytest.mark.integration


def test_hermes_created_at_naive_offset_zulu_and_future_become_the_right_archived_at(lab):
    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))
    naive, offset, zulu, future = events = files(lab, 4)
    ahead = (datetime.now(UTC) + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S.%f")
    created = {naive.path: "2026-11-25 01:02:03.456789", offset.path: "2026-11-25T03:02:03.456789+02:00",
               zulu.path: "2026-11-25T01:02:04Z", future.path: ahead}
    before = clock.clamped()
    with declared(s), cleanup_running(s) as workers:
        ingested(s, events)
        lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", rses=[SOURCE, ARCHIVE])
        with HermesSender(s) as hermes:
            for e in events:
                hermes.send("transfer-done", transfer_done(e))
            wait_for(lambda: outcomes(workers, "released") == 4, timeout=60, what="4 sources released")
            lab.server.run_daemons("reaper", rses=[SOURCE])
            sent = datetime.now(UTC)
            for e in events:
                hermes.send("deletion-done", {"scope": "lst", "name": e.path, "rse": SOURCE, "bytes": e.size,
                                              "url": f"file://localhost{e.path}"}, created_at=created[e.path])
            wait_for(lambda: outcomes(workers, "archived") == 4, timeout=60, what="4 file-archived")
        handled = datetime.now(UTC)
        archived = {a.name: a.archived_at for a in (decode_file_archived(m.body)
                                                    for m in get_all(s, topology.archived_queue(s)))}
    instant = datetime(2026, 11, 25, 1, 2, 3, 456789, tzinfo=UTC)
    assert archived[naive.path] == instant  # naive = UTC
    assert archived[offset.path] == instant  # +02:00 honoured, not dropped (was 03:02:03 UTC)
    assert archived[zulu.path] == datetime(2026, 11, 25, 1, 2, 4, tzinfo=UTC)
    assert sent <= archived[future.path] <= handled  # three hours ahead: clamped to the receive time
    assert clock.clamped() == before + 1
