"""SIGTERM of a consumer with a backlog (issue 11 §4), on the real RabbitMQ and Rucio server, through the CLI.

An ack logged must be an ack the broker has, and only the batch in progress is finished: what was received but
not started goes back to the queue without spending its delivery budget, well inside a 30 s grace period.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from injector.events import FileClosed
from producers.publish import DaqPublisher
from tests.integration.conftest import Lab
from tests.integration.rabbit import declared, depth, get_all, wait_for
from tests.integration.test_ingest_rucio import settings_for, stream_toml, write_config

pytestmark = pytest.mark.integration

RUNS = int(os.environ.get("SHUTDOWN_RUNS", "50"))
GRACE = 30.0  # a typical termination grace (systemd TimeoutStopSec, Kubernetes terminationGracePeriodSeconds)


def backlog(lab: Lab, n: int) -> list[FileClosed]:
    """File-closed events for files under the stream's root (ingest never reads the bytes)."""
    return [FileClosed.create(site="ORM", instrument="LST1", path=f"{lab.root}/20261124/run{i:06d}.fits.fz",
                              size=1000 + i, adler32=f"{i:08x}", night="20261124") for i in range(n)]


def settled(log: str) -> int:
    """Messages the consumer logged as settled (acked: done or dead-lettered)."""
    return sum(1 for line in log.splitlines() if " injector.settle: done " in line or
               " injector.settle: dead-letter " in line)


def stable_depth(s, queue: str) -> int:
    """The queue's ready count once it stops changing (returns of a closed channel take a moment)."""
    last, same = -1, 0
    while same < 3:
        time.sleep(0.1)
        n = depth(s, queue)
        same, last = (same + 1, n) if n == last else (0, n)
    return last


def test_sigterm_at_random_points_acks_exactly_what_it_logged_and_hands_the_rest_back_uncounted(own_lab, tmp_path):
    lab = own_lab  # tens of thousands of files with rules: not on the session's server
    s = settings_for(lab, ingest={"batch_size": 250})
    events = backlog(lab, 4000 + 400 * RUNS)
    config = write_config(s, tmp_path / "injector.toml", stream_toml(lab), ingest="batch_size = 250\n")
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(config), "RUCIO_CONFIG": str(lab.server.client_config)}
    rng = random.Random(11)
    discrepancies, stops = [], []
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            for i in range(0, len(events), 5000):
                daq.publish(events[i:i + 5000])
        for run in range(RUNS):
            before = stable_depth(s, s.ingest.queue)
            log_path = tmp_path / f"ingest-{run}.log"
            with log_path.open("w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "ingest"], env=env, stderr=log)
                wait_for(lambda p=log_path: "consuming" in p.read_text(), timeout=30, what="consumer started")
                time.sleep(rng.uniform(0.05, 2.5))
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(GRACE)
                stops.append(time.monotonic() - sent)
            text = Path(log_path).read_text()
            assert rc == 0, text[-3000:]
            acked = before - stable_depth(s, s.ingest.queue)
            if acked != settled(text):
                discrepancies.append((run, acked, settled(text)))
        left = get_all(s, s.ingest.queue)
    assert not discrepancies, f"(run, acked by the broker, logged settled): {discrepancies}"
    assert max(stops) < GRACE / 3, f"slowest stop {max(stops):.1f}s"
    budget = [(m.properties.get("application_headers") or {}) for m in left]
    spent = [h for h in budget if int(h.get("x-delivery-count", 0) or 0) or int(h.get("injector-retries", 0) or 0)]
    assert not spent, f"{len(spent)} of {len(left)} messages had delivery budget spent by a stop: {spent[:3]}"
    print(f"\n{RUNS} SIGTERMs: stop took {min(stops):.1f}-{max(stops):.1f}s, 0 discrepancies, {len(left)} left "
          f"unspent")
