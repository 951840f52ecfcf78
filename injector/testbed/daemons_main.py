"""Run Rucio daemons one pass each (runs INSIDE the Rucio server venv; imports only Rucio + stdlib).

    RUCIO_CONFIG=server.cfg python daemons_main.py --rses SRC,DST judge-evaluator submitter poller finisher

The mock transfertool marks transfers DONE without moving data; here its submit really copies
the bytes from the source PFN to the destination PFN (file:// only), so the archive holds the file.
A source that is not there fails that transfer as FTS would (the job's other transfers go on): the reason
is noted beside the server's config (FAILED_NOTES, one JSON line per request, so a later poller pass in
another process finds it) and the poller then reports the request FAILED with it, so the real
poller → finisher → hermes path emits transfer-failed and Rucio's retries and STUCK locks follow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from urllib.parse import urlparse

HERMES_LINGER = 0.5  # seconds
FAILED_NOTES = "mock-transfers-failed.jsonl"


def _path(url: str) -> str:
    return urlparse(url).path


def _notes() -> str:
    return os.path.join(os.path.dirname(os.environ["RUCIO_CONFIG"]), FAILED_NOTES)


def _failed() -> dict[str, str]:
    """request id -> FTS-like reason, for the transfers whose copy failed at submit."""
    if not os.path.exists(_notes()):
        return {}
    with open(_notes()) as f:
        return {d["request_id"]: d["reason"] for d in map(json.loads, f)}


def _copy(t) -> None:  # type: ignore[no-untyped-def]
    src, dst = _path(t.source_url(t.src)), _path(t.dest_url)
    if not os.path.exists(src):
        reason = f"SOURCE [2] Failed to stat file {src}: No such file or directory (testbed mock transfer tool)"
        with open(_notes(), "a") as f:
            f.write(json.dumps({"request_id": t.rws.request_id, "reason": reason}) + "\n")
        logging.warning("testbed copy %s -> %s FAILED: %s", src, dst, reason)
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    logging.info("testbed copy %s -> %s", src, dst)


def _copying_mock() -> None:
    from rucio.core.request import get_transfer_error
    from rucio.db.sqla.constants import RequestState
    from rucio.transfertool import mock

    class Failed(mock.MockTransferStatusReport):  # type: ignore[misc]
        supported_db_fields = ["state", "external_id", "err_msg"]

        def __init__(self, request_id: str, external_id: str, reason: str) -> None:
            super().__init__(request_id, external_id)
            self.state = RequestState.FAILED
            self.reason, self.err_msg = reason, get_transfer_error(RequestState.FAILED, reason)

        def get_monitor_msg_fields(self, session, logger=logging.log):  # type: ignore[no-untyped-def]
            return {"reason": self.reason}

    submit, bulk_query = mock.MockTransfertool.submit, mock.MockTransfertool.bulk_query

    def copying_submit(self, transfers, job_params, timeout=None):  # type: ignore[no-untyped-def]
        for t in transfers:
            _copy(t)
        return submit(self, transfers, job_params, timeout)

    def failing_query(self, requests_by_eid, timeout=None):  # type: ignore[no-untyped-def]
        response, failed = bulk_query(self, requests_by_eid, timeout), _failed()
        for eid, reports in response.items():
            for rid in [r for r in reports if r in failed]:
                reports[rid] = Failed(rid, eid, failed[rid])
        return response

    mock.MockTransfertool.submit = copying_submit
    mock.MockTransfertool.bulk_query = failing_query


def _next_reaper_cycle(rses: list[str]) -> None:
    """A testbed pass is the reaper's next cycle, now: Rucio pauses an RSE for two minutes after a cycle that found
    nothing to delete there (and excludes one after failed deletions), a throttle it keeps in memcached; forget it
    for these RSEs, as if that time had passed."""
    from rucio.core.rse import list_rses
    from rucio.daemons.reaper.reaper import REGION

    for rse in list_rses():
        if not rses or rse["rse"] in rses:
            REGION.delete(f"pause_deletion_{rse['id']}")
            REGION.delete(f"temporary_exclude_{rse['id']}")


def run(name: str, rses: list[str]) -> None:
    if name == "judge-evaluator":
        from rucio.daemons.judge.evaluator import re_evaluator
        re_evaluator(once=True, did_limit=10000)
    elif name == "judge-cleaner":
        from rucio.daemons.judge.cleaner import rule_cleaner
        rule_cleaner(once=True)
    elif name == "judge-repairer":
        from rucio.daemons.judge.repairer import rule_repairer
        rule_repairer(once=True)
    elif name == "submitter":
        from rucio.daemons.conveyor.submitter import submitter
        submitter(once=True, partition_wait_time=0, transfertools=["mock"], bulk=1000)
    elif name == "poller":
        from rucio.daemons.conveyor.poller import poller
        poller(once=True, partition_wait_time=0, older_than=0, transfertool="mock", db_bulk=10000, fts_bulk=1000)
    elif name == "finisher":
        from rucio.daemons.conveyor.finisher import finisher
        finisher(once=True, partition_wait_time=0, db_bulk=10000, bulk=1000)
    elif name == "reaper":
        from rucio.daemons.reaper.reaper import reaper
        _next_reaper_cycle(rses)
        # The RSEs as an expression, not a list: Rucio caches the reaper's RSE list under a key that spells the
        # list out ("['A', 'B']"), and memcached refuses keys with whitespace (the pass dies with two RSEs).
        reaper(rses=[], include_rses="|".join(rses) or None, exclude_rses=None, once=True, greedy=True,
               chunk_size=1000)
    elif name == "hermes":
        from rucio.daemons.hermes.hermes import hermes
        hermes(once=True, bulk=10000)
    else:
        raise SystemExit(f"unknown daemon {name!r}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rses", default="")
    p.add_argument("daemons", nargs="+")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")
    _copying_mock()
    rses = [r for r in args.rses.split(",") if r]
    for name in args.daemons:
        logging.info("=== %s", name)
        run(name, rses)
    if "hermes" in args.daemons:
        # hermes sends without receipts and never disconnects; exiting at once closes its sockets while the
        # broker may still be routing the last frames (RabbitMQ's STOMP plugin then drops some: 2-4 of 610
        # measured here, none after 0.5 s). A long-running hermes keeps its connections; linger like it.
        time.sleep(HERMES_LINGER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
