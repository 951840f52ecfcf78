"""A Rucio outage never turns events into dead letters (issue 11 §1), on the real Rucio server and brokers.

The real server's REST API is stopped (gunicorn killed) in the middle of a stream of events and started again
on the same port and database. The consumers must hold what they have unacked, take nothing new, probe with
backoff, and finish everything once Rucio answers: every file registered (or source released) exactly once,
no dead letter, and no delivery budget spent (every delivery the handler saw was a first delivery).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from consumers.services import cleanup_worker, ingest_worker
from injector import deadletter, topology
from injector.events import FileClosed, encode
from injector.gateway import ClientGateway
from injector.messages import Delivery
from injector.settle import Outcome
from injector.testbed.rucio import PASSWORD, USERNAME, RucioServer
from injector.worker import BatchWorker
from producers.publish import DaqPublisher
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.hermes import HermesSender
from tests.integration.httpfault import RucioProxy
from tests.integration.rabbit import declared, depth, get_all, ingested, running, wait_for
from tests.integration.test_cleanup_rucio import cleanup_dead_letters as dead_letters
from tests.integration.test_cleanup_rucio import cleanup_settings, outcomes, transfer_done
from tests.integration.test_ingest_rucio import files, settings_for

pytestmark = pytest.mark.integration

FAST_PROBES = {"probe_first": 0.5, "probe_cap": 3.0}  # the defaults (1 s → 60 s) would only make the tests slow


@pytest.fixture
def lab(own_lab: Lab) -> Lab:
    """This module stops its Rucio server and registers thousands of files: its own server, not the session's."""
    return own_lab


@contextmanager
def rucio_down(server: RucioServer) -> Iterator[None]:
    """Rucio's REST API stopped; always started again (same port, same database)."""
    server.halt()
    try:
        yield
    finally:
        server.serve()


class Attempts:
    """Wraps a worker's handler: records the delivery count of every delivery it is given."""

    def __init__(self, worker: BatchWorker) -> None:
        self.seen: list[int] = []
        self.again: list[tuple[str | None, float, dict[str, Any]]] = []  # redeliveries: id, when, headers
        self._process = worker.process
        worker.process = self

    def __call__(self, batch: list[Delivery]) -> Sequence[Outcome]:
        self.seen.extend(d.attempts for d in batch)
        self.again.extend((d.message_id, time.time(), d.headers) for d in batch if d.attempts > 1)
        return self._process(batch)


def paced(s: Any, events: list[Any], per_second: float) -> threading.Thread:
    """Publish `events` as the DAQ does, in a thread at `per_second`, ten at a time."""

    def run() -> None:
        with DaqPublisher(s.broker) as daq:  # closed after the burst: nobody services its heartbeats later
            for i in range(0, len(events), 10):
                daq.publish(events[i:i + 10])
                time.sleep(10 / per_second)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    opened = [r for r in caplog.records if r.name == "injector.breaker" and r.levelno == logging.WARNING]
    closed = [r for r in caplog.records if r.name == "injector.breaker" and "available again" in r.getMessage()]
    return len(opened), len(closed)


@pytest.mark.parametrize("seconds", [20, 120])
def test_a_rucio_outage_during_a_burst_dead_letters_nothing_and_spends_no_delivery_budget(lab, caplog, seconds):
    caplog.set_level(logging.INFO)
    s = settings_for(lab, rucio=FAST_PROBES)
    events = files(lab, 500)
    worker = ingest_worker(s, lab.gateway(s))
    attempts = Attempts(worker)
    with declared(s), running(worker):
        burst = paced(s, events, per_second=50)  # 10 s of events
        wait_for(lambda: worker.stats.messages >= 50, timeout=30, what="ingest under way")
        with rucio_down(lab.server):
            wait_for(lambda: worker.breaker is not None and worker.breaker.open, timeout=30, what="breaker open")
            live, why = worker.metrics.health()
            assert live and "rucio unavailable since" in why  # liveness holds: a restart cannot help
            assert worker.metrics.ready() == (False, f"rucio {worker.metrics.rucio()}")
            time.sleep(seconds)
            held = worker.stats.messages
        burst.join(30)
        wait_for(lambda: worker.stats.messages == 500, timeout=120, what="every event settled once Rucio is back")
        dead = depth(s, topology.dead_letter_queue(s.ingest.queue))
    assert held < 500, "the outage really stopped ingest"
    assert dead == 0
    assert sorted(attempts.seen) == [1] * len(attempts.seen), f"a redelivery spent delivery budget: {attempts.again}"
    assert set(worker.stats.outcomes) <= {"registered", "already-registered"}
    datasets = {f"LST1_{lab.tag}_20261124_raw"}
    assert sum(len(lab.content(d)) for d in datasets) == 500
    assert len(lab.replicas([e.path for e in events])) == 500
    assert outage_lines(caplog) == (1, 1), "one WARNING when it opens, one INFO when it closes"
    assert worker.breaker is not None and not worker.breaker.open and worker.breaker.outages == 1


def test_an_outage_longer_than_the_hold_hands_everything_back_uncounted_and_finishes_after(lab, caplog):
    caplog.set_level(logging.INFO)
    s = settings_for(lab, rucio=FAST_PROBES, broker={"outage_hold": 3})
    events = files(lab, 60)
    worker = ingest_worker(s, lab.gateway(s))
    attempts = Attempts(worker)
    with declared(s), DaqPublisher(s.broker) as daq, running(worker):
        with rucio_down(lab.server):
            daq.publish(events)
            wait_for(lambda: worker.stats.handed_back >= 60, timeout=60, what="everything handed back")
            wait_for(lambda: depth(s, s.ingest.queue) == 60, timeout=30, what="all 60 back in the queue")
            time.sleep(2)  # disconnected: nothing is taken while Rucio is down
            assert depth(s, s.ingest.queue) == 60
        wait_for(lambda: worker.stats.messages == 60, timeout=60, what="ingested once Rucio is back")
        dead = depth(s, topology.dead_letter_queue(s.ingest.queue))
    assert dead == 0 and sorted(attempts.seen) == [1] * len(attempts.seen)
    assert len(lab.content(f"LST1_{lab.tag}_20261124_raw")) == 60


def archived_at_pic(lab: Lab, names: list[str], passes: int = 5) -> None:
    """Rucio's transfer daemons, one pass at a time, until every file is AVAILABLE at the archive."""
    for _ in range(passes):
        lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", rses=[SOURCE, ARCHIVE])
        if all(r["states"].get(ARCHIVE) == "AVAILABLE" for r in lab.replicas(names).values()):
            return
    raise AssertionError(f"not all of {len(names)} files AVAILABLE at {ARCHIVE} after {passes} daemon passes")


@pytest.fixture(params=["rabbitmq", "activemq"])
def stomp_broker(request: pytest.FixtureRequest) -> tuple[str, str, int]:
    if request.param == "activemq":
        return "activemq", "127.0.0.1", request.getfixturevalue("activemq").stomp_port
    return "rabbitmq", "127.0.0.1", 61613


def test_cleanup_waits_out_an_outage_mid_stream_of_transfer_done_events(lab: Lab, stomp_broker, caplog):
    caplog.set_level(logging.INFO)
    s = cleanup_settings(lab, stomp_broker)
    s = s.model_copy(update={"rucio": s.rucio.model_copy(update=FAST_PROBES)})
    events: list[FileClosed] = files(lab, 120)
    with declared(s):
        ingested(s, events, lab.gateway(s))
        lab.discard_rucio_events()
        archived_at_pic(lab, [e.path for e in events])
        worker = cleanup_worker(s, lab.gateway(s))
        worker.batching.batch_window = 0.1
        attempts = Attempts(worker)
        with running(worker):
            wait_for(lambda: worker.metrics.health()[0], timeout=30, what="cleanup subscribed")
            with HermesSender(s) as hermes:
                for e in events[:40]:
                    hermes.send("transfer-done", transfer_done(e))
                wait_for(lambda: outcomes([worker], "released") >= 1, timeout=30, what="releases under way")
                with rucio_down(lab.server):
                    for e in events[40:]:
                        hermes.send("transfer-done", transfer_done(e))
                    wait_for(lambda: worker.breaker is not None and worker.breaker.open, timeout=30,
                             what="breaker open")
                    time.sleep(20)
            wait_for(lambda: worker.stats.messages == 120, timeout=120, what="every transfer-done settled")
        dead = dead_letters(s)
    assert not dead and sorted(attempts.seen) == [1] * len(attempts.seen)
    assert outcomes([worker], "released") == 120 and set(worker.stats.outcomes) == {"released"}
    lab.server.run_daemons("reaper", rses=[SOURCE])  # every source really was released
    assert all(list(r["states"]) == [ARCHIVE] for r in lab.replicas([e.path for e in events]).values())
    assert outage_lines(caplog) == (1, 1)


@pytest.fixture
def proxy(lab: Lab) -> Iterator[RucioProxy]:
    p = RucioProxy(lab.server.url)
    yield p
    p.close()


def through(proxy: RucioProxy, s: Any) -> ClientGateway:
    """A gateway whose Rucio client talks to the server through `proxy`."""
    from rucio.client import Client

    def client() -> Any:
        return Client(rucio_host=proxy.url, auth_host=proxy.url, account="root", auth_type="userpass",
                      creds={"username": USERNAME, "password": PASSWORD}, timeout=10)

    return ClientGateway(s.rucio, factory=client)


def test_503s_from_a_proxy_in_front_of_rucio_are_an_outage_waited_out(lab, proxy):
    s = settings_for(lab, rucio=FAST_PROBES)
    events = files(lab, 100)
    gateway = through(proxy, s)
    worker = ingest_worker(s, gateway)
    attempts = Attempts(worker)
    with declared(s), running(worker):
        proxy.unavailable = True
        with DaqPublisher(s.broker) as daq:
            daq.publish(events)
        wait_for(lambda: gateway.breaker.open, timeout=60, what="breaker open")
        time.sleep(8)
        assert worker.stats.messages == 0
        proxy.unavailable = False
        wait_for(lambda: worker.stats.messages == 100, timeout=60, what="ingested once the proxy answers")
        dead = depth(s, topology.dead_letter_queue(s.ingest.queue))
    assert dead == 0 and sorted(attempts.seen) == [1] * len(attempts.seen)
    assert set(worker.stats.outcomes) == {"registered"} and gateway.breaker.outages == 1


def test_a_bare_500_for_one_event_while_rucio_answers_dead_letters_that_event_only(lab, proxy):
    s = settings_for(lab, broker={"delivery_limit": 2})
    events = files(lab, 20)
    poison = events[7]
    proxy.poison = "Run00007"  # the server "chokes" on any request naming this file
    gateway = through(proxy, s)
    worker = ingest_worker(s, gateway)
    worker.batching.retry_pause = 0.2
    with declared(s), running(worker):
        with DaqPublisher(s.broker) as daq:
            daq.publish(events)
        wait_for(lambda: depth(s, topology.dead_letter_queue(s.ingest.queue)) == 1, timeout=60, what="dead letter")
        (dead,) = get_all(s, topology.dead_letter_queue(s.ingest.queue))
    h = dead.properties["application_headers"]
    assert dead.body == encode(poison) and h[deadletter.REASON] == "rucio-unavailable"
    assert "500" in h[deadletter.ERROR] and h[deadletter.ATTEMPTS] == 2
    assert sorted(lab.content(f"LST1_{lab.tag}_20261124_raw")) == sorted(e.path for e in events if e is not poison)
    assert gateway.breaker.outages == 0 and proxy.refused > 0, "Rucio answered throughout: never an outage"
