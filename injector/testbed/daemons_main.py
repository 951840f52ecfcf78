"""Run Rucio daemons one pass each (runs INSIDE the Rucio server venv; imports only Rucio + stdlib).

    RUCIO_CONFIG=server.cfg python daemons_main.py --rses SRC,DST judge-evaluator submitter poller finisher

The mock transfertool marks transfers DONE without moving data; here its submit really copies
the bytes from the source PFN to the destination PFN (file:// only), so the archive holds the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from urllib.parse import urlparse

HERMES_LINGER = 0.5  # seconds


def _path(url: str) -> str:
    return urlparse(url).path


def _copying_mock() -> None:
    from rucio.transfertool import mock

    original = mock.MockTransfertool.submit

    def submit(self, transfers, job_params, timeout=None):  # type: ignore[no-untyped-def]
        for t in transfers:
            src, dst = _path(t.source_url(t.src)), _path(t.dest_url)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
            logging.info("testbed copy %s -> %s", src, dst)
        return original(self, transfers, job_params, timeout)

    mock.MockTransfertool.submit = submit


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
        reaper(rses=rses, include_rses=None, exclude_rses=None, once=True, greedy=True, chunk_size=1000)
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
