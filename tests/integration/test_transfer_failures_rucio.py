"""Failed transfers on the real daemon path: a source gone from disk → the testbed's mock transfer tool fails
the transfer → Rucio's poller, finisher and hermes → transfer-failed → the cleanup consumer (RabbitMQ)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from injector.config import Settings
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.hermes import HermesSender
from tests.integration.rabbit import declared, ingested, wait_for
from tests.integration.test_cleanup_rucio import (
    RABBIT_STOMP,
    cleanup_dead_letters,
    cleanup_running,
    cleanup_settings,
    hermes_for,
    outcomes,
    transfer_done,
)
from tests.integration.test_ingest_rucio import files

pytestmark = pytest.mark.integration


def attempt(lab: Lab, s: Settings) -> str:
    """One transfer attempt through Rucio's own daemons, its events sent by hermes; returns their log."""
    return lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", "hermes",
                                  rses=[SOURCE, ARCHIVE], hermes=hermes_for(s))


def request_of(lab: Lab, name: str) -> dict[str, Any]:
    return dict(lab.client.list_request_by_did(name, ARCHIVE, scope="lst"))


def failures(workers: list[Any]) -> int:
    """transfer-failed events handled (a dead-lettered one is labelled by its reason, transfer-failed too)."""
    return outcomes(workers, "transfer-failed") + outcomes(workers, "transfer-failed-known")


def test_a_vanished_source_fails_its_transfer_with_an_fts_like_reason_and_hermes_sends_transfer_failed(lab):
    lab.discard_rucio_events()
    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))
    (e,) = files(lab, 1)
    with declared(s), cleanup_running(s) as workers:
        ingested(s, [e])
        Path(e.path).unlink()
        log = attempt(lab, s)
        wait_for(lambda: outcomes(workers, "transfer-failed") == 1, timeout=60, what="a transfer-failed")
    req = request_of(lab, e.path)
    assert "No such file or directory" in log and "REQUEUED" in log, log[-3000:]
    assert req["state"] != "SUBMITTING" and req["retry_count"] == 1  # failed, retried by Rucio: not stuck


def test_failed_transfers_of_one_file_across_a_consumer_restart_dead_letter_it_once_per_episode(lab):
    lab.discard_rucio_events()
    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))  # failure_limit 3; Rucio tries a request 4 times
    (e,) = files(lab, 1)
    with declared(s):
        ingested(s, [e])
        Path(e.path).unlink()
        with cleanup_running(s) as first:
            attempt(lab, s)
            attempt(lab, s)
            wait_for(lambda: outcomes(first, "transfer-failed") == 2, timeout=60, what="2 transfer-failed")
        with cleanup_running(s) as second:  # a restart: the count is on the file in Rucio, not in the process
            attempt(lab, s)
            attempt(lab, s)  # Rucio's last retry: the lock goes STUCK
            wait_for(lambda: failures(second) == 2, timeout=60, what="2 more transfer-failed")
            wait_for(lambda: len(cleanup_dead_letters(s)) >= 1, timeout=20, what="the file dead-lettered")
            assert outcomes(second, "transfer-failed-known") == 1
            (rule,) = lab.rules(f"LST1_{lab.tag}_20261124_raw")
            assert lab.client.get_replication_rule(rule["id"])["state"] == "STUCK"
            # A new episode: an operator's new rule on the file starts a new request chain, which fails again.
            lab.client.add_replication_rule([{"scope": "lst", "name": e.path}], 1, ARCHIVE)
            for _ in range(3):
                attempt(lab, s)
            wait_for(lambda: len(cleanup_dead_letters(s)) >= 2, timeout=30, what="the new episode dead-lettered")
        dead = cleanup_dead_letters(s)
    assert len(dead) == 2
    assert all(h["dlq-reason"] == "transfer-failed" and e.path in h["dlq-error"] for h in dead)
    assert all(h["dlq-error"].count("No such file or directory") == 3 for h in dead)


def test_reconcile_names_the_file_whose_transfer_keeps_failing_and_the_files_behind_a_stuck_rule(lab):
    from tests.integration.test_reconcile_rucio import sweep

    lab.discard_rucio_events()
    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))
    gone, fine = files(lab, 2)
    with declared(s), cleanup_running(s) as workers:
        ingested(s, [gone, fine])
        Path(gone.path).unlink()
        attempt(lab, s)
        attempt(lab, s)
        wait_for(lambda: failures(workers) == 2, timeout=60, what="2 transfer-failed")
        retrying = [f for f in sweep(s, dry_run=True) if f.subject == f"lst:{gone.path}"]
        attempt(lab, s)
        attempt(lab, s)  # Rucio's last retry: the lock and the dataset's rule go STUCK
        stuck = sweep(s, dry_run=True)
    (failing,) = [f for f in retrying if f.kind == "transfer-failing"]  # was: nothing to do while Rucio retries
    assert "2 failed transfer(s) to PIC-ARCHIVE" in failing.detail and "No such file or directory" in failing.detail
    assert any(f.kind == "rule-stuck" for f in stuck)
    (named,) = [f for f in stuck if f.kind == "transfer-stuck"]  # the file, not only the dataset's rule
    assert named.subject == f"lst:{gone.path}" and named.action == "report"
    assert "lock STUCK at PIC-ARCHIVE" in named.detail and "after 4 attempt(s)" in named.detail
    assert "No such file or directory" in named.detail and f"the source {gone.path} is GONE from disk" in named.detail
    assert not [f for f in stuck if f.subject == f"lst:{fine.path}" and f.kind.startswith("transfer-")]


def test_transfer_done_of_a_stream_this_config_lacks_is_unmanaged_and_reconcile_with_it_finishes_the_file(lab):
    from producers.publish import file_closed
    from tests.integration.rabbit import unique_settings
    from tests.integration.test_reconcile_rucio import sweep

    lab.discard_rucio_events()
    other = Lab(lab.client, lab.server)  # stream B: its own storage root under the same source RSE and scope
    stream_b = other.stream(name="lst2-raw", instrument="LST2")
    with_b = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))
    with_b = unique_settings({"streams": [lab.stream(), stream_b]}, ingest={"batch_window": 0.1},
                             cleanup=with_b.cleanup.model_dump(), broker={"delivery_limit": 3})
    without_b = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))  # started before stream B was added
    path = other.write("20261124/LST-2.1.Run00001.fits.fz", b"stream B's bytes")
    e = file_closed(path, site="ORM", instrument="LST2", night="20261124", run=1)
    with declared(with_b):
        ingested(with_b, [e])
        lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", rses=[SOURCE, ARCHIVE])
    with declared(without_b), cleanup_running(without_b) as workers:
        with HermesSender(without_b) as hermes:
            hermes.send("transfer-done", transfer_done(e))
        wait_for(lambda: sum(w.stats.messages for w in workers) == 1, timeout=30, what="the transfer-done")
        assert outcomes(workers, "unmanaged") == 1 and outcomes(workers, "source-gone") == 0
    assert SOURCE in lab.replicas([e.path])[e.path]["states"] and Path(e.path).exists()  # nothing released
    assert not lab.client.get_metadata("lst", e.path, plugin="JSON").get("injector_released_at")
    with declared(with_b):
        found = [f for f in sweep(with_b) if f.subject == f"lst:{e.path}"]
    assert [(f.kind, f.action) for f in found] == [("release-source", "done")]
    lab.server.run_daemons("reaper", rses=[SOURCE])
    assert not Path(e.path).exists() and list(lab.replicas([e.path])[e.path]["states"]) == [ARCHIVE]
