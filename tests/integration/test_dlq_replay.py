"""Replay on the real RabbitMQ is exact: it works on the dead letters present when it started, leaves every
message in exactly one place, and its summary says exactly what it did (issue 11, section 2)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu
import pytest

from consumers.services import ingest_worker
from injector.config import Settings
from injector.deadletter import Filter
from injector.testing import FakeRucio
from injector.topology import TopologyMissing
from injector.worker import BatchWorker
from operations.dlq import RabbitDlq
from operations.dlq.replay import ReplaySummary
from tests.conftest import STREAMS
from tests.integration.netfault import Proxy
from tests.integration.rabbit import declared, depth, get_all, running, unique_settings, wait_for
from tests.integration.test_dlq import dlq_name, fill_dlq

pytestmark = pytest.mark.integration

Key = tuple[str, int]  # (message id, replay count): one dead letter, told apart from its later returns


@pytest.fixture
def settings() -> Iterator[Settings]:
    with declared(unique_settings(STREAMS, ingest={"batch_window": 0.05})) as s:
        yield s


def contents(s: Settings) -> Counter[Key]:
    """Every dead letter in the ingest DLQ, by (id, replay count), counted."""
    return Counter((r.id, r.replay_count) for r in RabbitDlq(s.broker).peek(dlq_name(s)))


class Recorder:
    """An ingest consumer on FakeRucio that records the message id of every event it processed."""

    def __init__(self, s: Settings) -> None:
        self.worker: BatchWorker = ingest_worker(s, FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"}))
        self.ids: Counter[str] = Counter()
        self.lock = threading.Lock()
        process = self.worker.process

        def recording(batch: list[Any]) -> Any:
            with self.lock:
                self.ids.update(d.message_id for d in batch)
            return process(batch)

        self.worker.process = recording

    def processed(self) -> int:
        return self.worker.stats.messages


@contextmanager
def ingest_running(s: Settings) -> Iterator[Recorder]:
    recorder = Recorder(s)
    with running(recorder.worker):
        yield recorder


def test_replaying_a_thousand_while_ingest_fails_some_again_is_exact_ten_times_in_a_row(settings):
    s = settings
    matching = set(fill_dlq(s, 600, reason="no-stream"))  # LST1: a stream matches now → registered
    still_bad = set(fill_dlq(s, 400, reason="no-stream", instrument="LST2"))  # matches no stream → back again
    untouched = Counter((i, 0) for i in fill_dlq(s, 100, reason="checksum-conflict"))
    dlq = RabbitDlq(s.broker)
    with ingest_running(s) as ingest:
        for round_ in range(10):
            before = contents(s)
            selected = Counter(k for k in before.elements() if k not in untouched)
            done_before, seen_before = ingest.processed(), Counter(ingest.ids)
            summary = dlq.replay(dlq_name(s), Filter(reason="no-stream"))
            what = f"round {round_ + 1}: {summary}"
            assert (summary.seen, summary.selected, summary.replayed, summary.failed) == (
                sum(before.values()), sum(selected.values()), sum(selected.values()), 0), what
            wait_for(lambda n=done_before + summary.replayed: ingest.processed() >= n, timeout=60, what=what)
            time.sleep(0.3)  # anything extra ingest would take (a duplicate) arrives meanwhile
            processed = Counter(ingest.ids) - seen_before
            assert processed == Counter(i for i, _ in selected.elements()), f"{what}: ingest took other ids"
            failed_again = Counter((i, n + 1) for i, n in selected.elements() if i in still_bad)
            assert contents(s) == untouched + failed_again, f"{what}: the DLQ is not before - replayed + failed"
            assert depth(s, s.ingest.queue) == 0
    assert {i for i, _ in selected} == still_bad and not matching & set(i for i, _ in contents(s))


def test_a_connection_dropped_mid_replay_loses_nothing_and_the_summary_says_what_happened(settings):
    s = settings
    ids = set(fill_dlq(s, 1000, reason="no-stream"))
    proxy = Proxy(("127.0.0.1", 5672))
    via = s.broker.model_copy(update={"urls": [f"amqp://guest:guest@127.0.0.1:{proxy.port}//"]})
    result: list[ReplaySummary] = []
    replay = threading.Thread(target=lambda: result.append(RabbitDlq(via).replay(dlq_name(s), rate=500)))
    try:
        replay.start()
        wait_for(lambda: depth(s, s.ingest.queue) >= 300, timeout=30, what="replay under way")
        assert proxy.drop() >= 1
        replay.join(60)
    finally:
        proxy.close()
    (summary,) = result
    assert summary.interrupted and "connection lost" in summary.interrupted, summary
    # cut after 300 copies reached the queue: those were confirmed (replayed) or in flight (doubtful) at the cut
    assert summary.replayed + summary.doubtful >= 300 and summary.replayed < 1000, summary
    assert summary.in_both == 0 and summary.unchecked == 0, summary
    back = Counter(m.properties["message_id"] for m in get_all(s, s.ingest.queue))
    still = contents(s)
    assert set(back) | {i for i, _ in still} == ids, "nothing lost"
    assert max(back.values()) == 1 and max(still.values()) == 1
    both = set(back) & {i for i, _ in still}
    assert len(both) <= summary.doubtful, f"{len(both)} in both places, only {summary.doubtful} reported doubtful"
    assert summary.replayed <= len(back) <= summary.replayed + summary.doubtful, summary
    again = RabbitDlq(s.broker).replay(dlq_name(s))
    assert again.clean and again.replayed == sum(still.values()) and not contents(s)
    assert set(m.properties["message_id"] for m in get_all(s, s.ingest.queue)) == {i for i, _ in still}


def test_replaying_a_dlq_that_does_not_exist_says_so_and_changes_nothing():
    s = unique_settings(STREAMS)
    with pytest.raises(TopologyMissing, match="does not exist on amqp://127.0.0.1:5672//: run `rucio-injector"):
        RabbitDlq(s.broker).replay(dlq_name(s))


def test_dead_letters_whose_queue_is_gone_fail_and_stay_dead_lettered_and_the_summary_says_why(settings):
    s = settings
    fill_dlq(s, 300, reason="no-stream")
    before = contents(s)
    with kombu.Connection(s.broker.urls[0]) as conn:
        conn.channel().queue_delete(s.ingest.queue)
    summary = RabbitDlq(s.broker).replay(dlq_name(s))
    assert (summary.selected, summary.replayed, summary.failed) == (300, 0, 300) and not summary.clean
    assert "unroutable" in summary.errors[0] and s.ingest.queue in summary.errors[0]
    assert contents(s) == before
    wrong = RabbitDlq(s.broker).replay(dlq_name(s), routing_key="file.closed.ORM.LST1")  # DAQ exchange: no binding
    assert (wrong.replayed, wrong.failed) == (0, 300) and contents(s) == before
