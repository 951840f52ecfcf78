"""The Rucio circuit breaker, the gateway's use of it, and the batch worker holding through an outage (in memory)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from rucio.common import exception as rx

from consumers.ingest import ingest
from injector.breaker import Breaker
from injector.config import RucioSettings
from injector.errors import RucioDown, RucioFailed
from injector.events import FileClosed, encode
from injector.gateway import ClientGateway, NewReplica, Registration, isolate
from injector.messages import Delivery
from injector.metrics import Metrics
from injector.settle import Outcome, Route
from injector.testing import FakeRucio, MemorySession, delivery
from injector.worker import Batching, BatchWorker


class Flaky:
    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("down")


def test_a_failing_probe_opens_the_breaker_once_and_a_passing_one_closes_it(caplog):
    caplog.set_level(logging.INFO, "injector.breaker")
    probe = Flaky()
    b = Breaker(probe, first=0.001, cap=0.002)
    probe.up = False
    assert not b.healthy() and not b.healthy() and b.open and b.outages == 1
    assert "ConnectionRefusedError: down" in b.reason and b.since is not None
    probe.up = True
    assert b.healthy() and not b.open and b.outage_seconds > 0
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.INFO], "one line when it opens, one when it closes"


def test_wait_probes_with_backoff_until_rucio_answers_or_stop_or_the_deadline():
    probe = Flaky()
    b = Breaker(probe, first=0.01, cap=0.02)
    probe.up = False
    b.healthy()
    stop = threading.Event()
    assert b.wait(stop, deadline=time.monotonic() + 0.1) is False and probe.calls >= 3
    threading.Timer(0.05, lambda: setattr(probe, "up", True)).start()
    assert b.wait(stop) is True and not b.open
    probe.up = False
    b.healthy()
    stop.set()
    assert b.wait(stop) is False


class StubClient:
    """rucio-clients as the server answers: a bare 500 (RucioException) for any bulk call holding `bad`."""

    def __init__(self) -> None:
        self.healthy = True
        self.calls = 0

    def whoami(self) -> dict[str, str]:
        if not self.healthy:
            raise rx.ServerConnectionException("Cannot connect to the Rucio server.")
        return {"account": "root"}

    def add_files_to_datasets(self, attachments: list[dict[str, Any]], ignore_duplicate: bool = False) -> None:
        self.calls += 1
        if not self.healthy:
            raise rx.ServerConnectionException("Cannot connect to the Rucio server.")
        if any(f["name"] == "bad" for a in attachments for f in a["dids"]):
            raise rx.RucioException("no error information passed (http status code: 500)")


def replica(name: str) -> NewReplica:
    return NewReplica("lst", name, 1, "00000001", f"file://localhost/data/{name}")


def register(gw: ClientGateway, part: Any) -> None:
    gw.register([Registration("lst", "LST1_20261124_raw", "SRC", tuple(part))])


def test_a_server_error_while_rucio_is_healthy_is_bisected_to_the_one_item_and_the_breaker_stays_closed():
    client = StubClient()
    gw = ClientGateway(RucioSettings(), client=client)
    items = [replica(f"f{i}") for i in range(7)] + [replica("bad")] + [replica(f"g{i}") for i in range(8)]
    failed = isolate(items, lambda part: register(gw, part))
    assert [(r.name, type(e)) for r, e in failed] == [("bad", RucioFailed)]
    assert not gw.breaker.open and "500" in str(failed[0][1])


def test_an_unanswered_call_with_a_failing_probe_is_an_outage_and_later_calls_fail_fast():
    client = StubClient()
    gw = ClientGateway(RucioSettings(), client=client)
    client.healthy = False
    failed = isolate([replica("a"), replica("b")], lambda part: register(gw, part))
    assert [type(e) for _, e in failed] == [RucioDown, RucioDown]
    assert gw.breaker.open and client.calls == 1, "no bisection and no second call during an outage"
    with pytest.raises(RucioDown):
        register(gw, [replica("c")])
    assert client.calls == 1


def test_a_bare_500_with_rucio_answering_dead_letters_only_the_bad_event_at_the_limit(settings):
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    events = [FileClosed.create(site="ORM", instrument="LST1", path=f"/data/lst1/r{i}.fits", size=i + 1,
                                adler32=f"{i + 1:08x}", night="20261124") for i in range(5)]
    original = rucio.register

    def add(registrations: Any) -> None:
        if any(r.name.endswith("r2.fits") for g in registrations for r in g.replicas):
            raise RucioFailed("RucioException: no error information passed (http status code: 500)")
        original(registrations)

    rucio.register = add  # type: ignore[method-assign]
    out = ingest(events, rucio, settings)
    assert [o.kind for o in out] == ["done", "done", "retry", "done", "done"]
    assert out[2].reason == "rucio-unavailable" and "500" in (out[2].error or "")


class MemoryLink:
    """A Link over a list: `incoming` is what the broker would deliver (while not paused)."""

    def __init__(self, incoming: list[Delivery], buffer: list[Delivery]) -> None:
        self.incoming = incoming
        self.buffer = buffer
        self.session = MemorySession()
        self.paused = False
        self.pauses = 0

    def pump(self, timeout: float) -> None:
        if not self.paused and self.incoming:
            self.buffer.extend(self.incoming)
            self.incoming.clear()
        time.sleep(min(timeout, 0.005))

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        pass


def memory_worker(rucio: FakeRucio, settings: Any, incoming: list[Delivery], hold: float = 60.0
                  ) -> tuple[BatchWorker, list[MemoryLink]]:
    links: list[MemoryLink] = []

    def connect(generation: int, buffer: list[Delivery]) -> MemoryLink:
        links.append(MemoryLink(incoming, buffer))
        return links[-1]

    def process(batch: list[Delivery]) -> list[Outcome]:
        from injector.events import decode_file_closed

        return ingest([decode_file_closed(d.body) for d in batch], rucio, settings)

    route = Route("q", "dlx", 5)
    w = BatchWorker(connect, route, process, Batching(2, 0.01, 10, outage_hold=hold), Metrics("t"), rucio.breaker)
    return w, links


def events_as_deliveries(n: int) -> list[Delivery]:
    return [delivery(encode(FileClosed.create(site="ORM", instrument="LST1", path=f"/data/lst1/x{i}.fits",
                                              size=i + 1, adler32=f"{i + 1:08x}", night="20261124")))
            for i in range(n)]


def run_until(worker: BatchWorker, stop: threading.Event, done: Any, timeout: float = 10) -> threading.Thread:
    t = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    t.start()
    wait_until(done, timeout)
    return t


def wait_until(done: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_during_an_outage_the_batch_is_held_unsettled_no_other_starts_and_it_is_processed_once_after(settings):
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    rucio.down = True
    w, links = memory_worker(rucio, settings, events_as_deliveries(4))
    stop = threading.Event()
    t = run_until(w, stop, lambda: rucio.breaker.open)
    time.sleep(0.1)
    session = links[0].session
    assert not session.acked and not session.requeued and not session.dead_letters and w.stats.batches == 0
    assert not links[0].paused, "not cancelled for an outage: RabbitMQ 3.x would count what it was sending"
    rucio.down = False
    wait_until(lambda: len(session.acked) == 4)  # the same worker, not a second run of it (it would never stop)
    stop.set()
    t.join(5)
    assert len(session.acked) == 4 and not session.requeued and not session.handed_back
    assert len(rucio.pfns) == 4 and w.stats.outcomes == {"registered": 4}


def test_a_stop_during_an_outage_hands_everything_back_and_a_hold_past_the_limit_too(settings):
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    rucio.down = True
    w, links = memory_worker(rucio, settings, events_as_deliveries(6))
    stop = threading.Event()
    t = run_until(w, stop, lambda: links and rucio.breaker.open)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    session = links[0].session
    assert len(session.handed_back) == 6 and not session.acked and not session.requeued

    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    rucio.down = True
    w, links = memory_worker(rucio, settings, events_as_deliveries(6), hold=0.05)
    stop = threading.Event()
    t = run_until(w, stop, lambda: w.stats.handed_back == 6)
    assert len(links[0].session.handed_back) == 6 and len(links) == 1, "disconnected until Rucio answers"
    rucio.down = False
    stop.set()
    t.join(5)
