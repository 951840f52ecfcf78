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

from injector import topology
from injector.events import FileClosed, encode
from producers.publish import DaqPublisher
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.hermes import HermesSender
from tests.integration.httpfault import RucioProxy
from tests.integration.rabbit import declared, depth, get_all, ingested, wait_for
from tests.integration.test_ingest_rucio import settings_for, stream_toml, write_config

pytestmark = pytest.mark.integration

RUNS = int(os.environ.get("SHUTDOWN_RUNS", "20"))  # the long run: SHUTDOWN_RUNS=50 (README)
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


def _stop_mid_call(proc: subprocess.Popen, proxy: RucioProxy, log_path: Path) -> str:
    """SIGTERM while the proxy holds the batch's slow Rucio call; the process's exit code must be 0."""
    assert proxy.held.wait(60), "the batch never reached its slow Rucio call"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(GRACE)
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    return text


def _unspent(messages: list) -> list:
    return [m for m in messages if not int((m.properties.get("application_headers") or {}).get("x-delivery-count", 0)
                                            or 0)]


def test_sigterm_during_a_slow_registration_finishes_that_batch_in_rucio_and_takes_nothing_else(own_lab, tmp_path):
    lab = own_lab  # files without bytes under rules: kept off the session server, whose daemons transfer for real
    s = settings_for(lab, ingest={"batch_size": 100})
    events = backlog(lab, 300)
    proxy = RucioProxy(lab.server.url)
    proxy.slow = ("POST", "/dids/attachments", 3.0)  # the registration (attach with an RSE)
    config = write_config(s, tmp_path / "injector.toml", stream_toml(lab), ingest="batch_size = 100\n")
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(config),
           "RUCIO_CONFIG": str(proxy.client_config(lab.server.client_config, tmp_path / "rucio.cfg"))}
    log_path = tmp_path / "ingest.log"
    try:
        with declared(s):
            with DaqPublisher(s.broker) as daq:
                daq.publish(events)
            with log_path.open("w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "ingest"], env=env, stderr=log)
                text = _stop_mid_call(proc, proxy, log_path)
            left = get_all(s, s.ingest.queue)
            dead = get_all(s, topology.dead_letter_queue(s.ingest.queue))
    finally:
        proxy.close()
    registered = lab.replicas([e.path for e in events])
    assert settled(text) == 100 and len(registered) == 100, "the batch in flight is finished, nothing else taken"
    assert len(lab.content(f"LST1_{lab.tag}_20261124_raw")) == 100
    assert len(left) == 200 and len(_unspent(left)) == 200, "the rest is handed back without spending budget"
    assert {m.body for m in left}.isdisjoint({encode(e) for e in events if e.path in registered})
    assert not dead


def test_sigterm_of_cleanup_during_a_slow_release_finishes_that_batch_in_rucio_and_takes_nothing_else(lab, tmp_path):
    from tests.integration.test_cleanup_rucio import RABBIT_STOMP, cleanup_settings, transfer_done
    from tests.integration.test_ingest_rucio import files
    from tests.integration.test_reconcile_rucio import TRANSFER

    s = cleanup_settings(lab, ("rabbitmq", *RABBIT_STOMP))
    events = files(lab, 30)
    proxy = RucioProxy(lab.server.url)
    proxy.slow = ("POST", "/replicas/tombstone", 3.0)  # the release
    st, c = s.streams[0], s.cleanup
    config = tmp_path / "injector.toml"
    config.write_text(
        f'[broker]\nurls = ["{s.broker.urls[0]}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
        f'dead_letter_exchange = "{s.broker.dead_letter_exchange}"\n[ingest]\nqueue = "{s.ingest.queue}"\n'
        f'[cleanup]\nqueue = "{c.queue}"\nhermes_destination = "{c.hermes_destination}"\nbatch_size = 10\n'
        f'[metrics]\ncleanup_port = 0\n[[streams]]\nname = "{st.name}"\nsite = "ORM"\ninstrument = "LST1"\n'
        f'source_rse = "{st.source_rse}"\nstorage_root = "{st.storage_root}"\nscope = "lst"\n'
        f'dataset = "{st.dataset}"\nrules = [{{ rse_expression = "{ARCHIVE}", copies = 1 }}]\n')
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(config),
           "RUCIO_CONFIG": str(proxy.client_config(lab.server.client_config, tmp_path / "rucio.cfg"))}
    log_path = tmp_path / "cleanup.log"
    try:
        with declared(s):
            ingested(s, events)
            lab.server.run_daemons(*TRANSFER, rses=[SOURCE, ARCHIVE])
            states = [r["states"].get(ARCHIVE) for r in lab.replicas([e.path for e in events]).values()]
            assert states == ["AVAILABLE"] * 30, states
            with HermesSender(s) as hermes:
                for e in events:
                    hermes.send("transfer-done", transfer_done(e))
            with log_path.open("w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "cleanup"], env=env, stderr=log)
                text = _stop_mid_call(proc, proxy, log_path)
            left = get_all(s, c.queue)
            dead = get_all(s, topology.dead_letter_queue(c.queue))
    finally:
        proxy.close()
    released = [n for n, when in lab.tombstones([e.path for e in events], SOURCE).items() if when is not None]
    assert settled(text) == 10 and len(released) == 10, "the batch in flight is released in Rucio, nothing else"
    assert len(left) == 20 and len(_unspent(left)) == 20, "the rest is handed back without spending budget"
    assert not dead
