"""Dead-letter operations on ActiveMQ's DLQ.<queue> (the cleanup consumer's, over STOMP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import stomp

from consumers.services import cleanup_worker
from injector import deadletter, topology
from injector.deadletter import Filter
from injector.testing import FakeRucio
from operations.dlq import ActiveMqDlq, dead_letter_queues
from tests.integration.netfault import Proxy
from tests.integration.rabbit import declared, running, unique_settings, wait_for

pytestmark = pytest.mark.integration


def settings_for(amq: Any) -> Any:
    tag = uuid.uuid4().hex[:8]
    return unique_settings({"streams": []}, cleanup={
        "flavour": "activemq", "stomp_hosts": [f"127.0.0.1:{amq.stomp_port}"], "app": f"app-{tag}",
        "hermes_destination": f"/topic/VirtualTopic.t-{tag}", "batch_window": 0.05})


def send(s: Any, *bodies: str) -> None:
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    conn = stomp.Connection12([(host, int(port))])
    conn.connect("guest", "guest", wait=True)
    for b in bodies:
        conn.send(s.cleanup.hermes_destination, b, headers={"persistent": "true"}, receipt=uuid.uuid4().hex)
    conn.disconnect()


def test_list_filter_replay_and_purge_on_activemq(activemq, tmp_path: Path):
    s = settings_for(activemq)
    (dlq_name,) = [q for q in dead_letter_queues(s) if q.startswith("DLQ.")]
    dlq = ActiveMqDlq(s.cleanup.server)
    worker = cleanup_worker(s)
    with declared(s), running(worker):
        wait_for(lambda: worker.metrics.health()[0], timeout=20, what="subscribed")
        send(s, "not json at all", '{"event_type": "transfer-done"}', "{broken")
        wait_for(lambda: dlq.depth(dlq_name) == 3, timeout=30, what="3 dead letters")
        listed = dlq.peek(dlq_name)
        assert [r.reason for r in listed] == ["invalid-event"] * 3
        assert all(r.source_queue == s.cleanup.consumer_queue for r in listed)
        assert [(r.id, r.body) for r in dlq.peek(dlq_name)] == [(r.id, r.body) for r in listed], "nothing consumed"

        cfg = tmp_path / "c.toml"
        c = s.cleanup
        cfg.write_text(f'[broker]\nurls = ["{s.broker.urls[0]}"]\ndaq_exchange = "{s.broker.daq_exchange}"\n'
                       f'dead_letter_exchange = "{s.broker.dead_letter_exchange}"\n'
                       f'[ingest]\nqueue = "{s.ingest.queue}"\n'
                       f'[cleanup]\nflavour = "activemq"\nstomp_hosts = ["{c.stomp_hosts[0]}"]\napp = "{c.app}"\n'
                       f'hermes_destination = "{c.hermes_destination}"\n')
        env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
        out = subprocess.run([sys.executable, "-m", "injector.cli", "dlq", "list", dlq_name, "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["by_reason"] == {"invalid-event": 3}

        first = listed[0]
        dry = dlq.replay(dlq_name, Filter(ids=(first.id,)), dry_run=True)
        assert dry.selected == 1 and dlq.depth(dlq_name) == 3
        done = dlq.replay(dlq_name, Filter(ids=(first.id,)))
        assert done.replayed == 1
        # The consumer gets it back, still invalid: dead-lettered again, now with replay-count 1.
        wait_for(lambda: any(r.replay_count == 1 for r in dlq.peek(dlq_name)), timeout=30, what="replayed copy")
        assert dlq.depth(dlq_name) == 3
        (again,) = [r for r in dlq.peek(dlq_name) if r.replay_count == 1]
        assert again.body == first.body

        assert dlq.purge(dlq_name, Filter(ids=(again.id,))) == 1
        assert dlq.depth(dlq_name) == 2
        assert dlq.purge(dlq_name) == 2 and dlq.depth(dlq_name) == 0


def dead_letter(s: Any, n: int, *, reason: str, valid: bool) -> list[str]:
    """n dead letters straight into DLQ.<consumer queue>, as the cleanup consumer writes them; each carries a
    `test-id` header (ActiveMQ gives every copy a new message id): valid ones are events no stream manages
    (acked on replay), the others are not JSON (dead-lettered again as invalid-event)."""
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    conn = stomp.Connection12([(host, int(port))])
    receipts: list[threading.Event] = []
    got: dict[str, threading.Event] = {}

    class Receipts(stomp.ConnectionListener):  # type: ignore[misc]
        def on_receipt(self, frame: Any) -> None:
            got[frame.headers["receipt-id"]].set()

    conn.set_listener("r", Receipts())
    conn.connect("guest", "guest", wait=True)
    ids = []
    for _ in range(n):
        ids.append(uuid.uuid4().hex)
        body = json.dumps({"event_type": "transfer-done", "payload": {"scope": "atlas", "name": ids[-1]}}) \
            if valid else f"not json {ids[-1]}"
        h = deadletter.headers({"test-id": ids[-1]}, reason=reason, error="test", exchange=s.cleanup.subscription,
                               routing_key="", queue=s.cleanup.consumer_queue, attempts=1)
        receipt = uuid.uuid4().hex
        got[receipt] = threading.Event()
        receipts.append(got[receipt])
        conn.send("/queue/" + topology.dead_letters_of(s, s.cleanup.consumer_queue), body,
                  headers={**{k: str(v) for k, v in h.items()}, "persistent": "true"}, receipt=receipt)
    assert all(r.wait(30) for r in receipts)
    conn.disconnect()
    return ids


def test_replay_on_activemq_takes_all_the_dead_letters_present_at_its_start_and_only_those_three_rounds(activemq):
    s = settings_for(activemq)
    (dlq_name,) = [q for q in dead_letter_queues(s) if q.startswith("DLQ.")]
    dlq = ActiveMqDlq(s.cleanup.server)
    worker = cleanup_worker(s, FakeRucio())
    seen: Counter[str] = Counter()
    process = worker.process

    def recording(batch: list[Any]) -> Any:
        seen.update(d.headers.get("test-id") for d in batch)
        return process(batch)

    worker.process = recording

    def contents() -> Counter[tuple[str, int]]:
        return Counter((r.headers["test-id"], r.replay_count) for r in dlq.peek(dlq_name))

    with declared(s), running(worker):
        wait_for(lambda: worker.metrics.health()[0], timeout=20, what="subscribed")
        fine = dead_letter(s, 600, reason="invalid-event", valid=True)  # more than a browser showed (400, 500)
        bad = set(dead_letter(s, 100, reason="invalid-event", valid=False))
        untouched = Counter((i, 0) for i in dead_letter(s, 30, reason="source-lost", valid=True))
        for round_ in range(3):
            before = contents()
            selected = Counter(k for k in before.elements() if k not in untouched)
            done_before, seen_before = worker.stats.messages, Counter(seen)
            summary = dlq.replay(dlq_name, Filter(reason="invalid-event"))
            what = f"round {round_ + 1}: {summary}"
            n = sum(selected.values())
            assert (summary.seen, summary.selected, summary.replayed, summary.failed, summary.in_both) == (
                sum(before.values()), n, n, 0, 0), what
            wait_for(lambda m=done_before + n: worker.stats.messages >= m, timeout=60, what=what)
            time.sleep(1.0)
            assert Counter(seen) - seen_before == Counter(i for i, _ in selected.elements()), what
            expected = untouched + Counter((i, k + 1) for i, k in selected.elements() if i in bad)
            wait_for(lambda e=expected: contents() == e, timeout=20, what=f"{what}: DLQ = before - replayed + failed")
    assert not set(fine) & {i for i, _ in contents()}


def test_a_connection_dropped_mid_replay_on_activemq_loses_nothing_and_the_summary_says_so(activemq):
    s = settings_for(activemq)
    (dlq_name,) = [q for q in dead_letter_queues(s) if q.startswith("DLQ.")]
    ids = set(dead_letter(s, 600, reason="invalid-event", valid=True))
    proxy = Proxy(("127.0.0.1", activemq.stomp_port))
    via = s.cleanup.model_copy(update={"stomp_hosts": [f"127.0.0.1:{proxy.port}"]})
    dlq = ActiveMqDlq(s.cleanup.server)
    consumer_queue = ActiveMqDlq(s.cleanup.server)

    def where() -> tuple[Counter[str], Counter[str]]:
        return (Counter(r.headers["test-id"] for r in consumer_queue.peek(s.cleanup.consumer_queue)),
                Counter(r.headers["test-id"] for r in dlq.peek(dlq_name)))

    result: list[Any] = []
    replay = threading.Thread(target=lambda: result.append(ActiveMqDlq(via.server).replay(dlq_name, rate=300)))
    try:
        replay.start()
        wait_for(lambda: sum(where()[0].values()) >= 200, timeout=30, what="replay under way")
        assert proxy.drop() >= 1
        replay.join(60)
    finally:
        proxy.close()
    (summary,) = result
    assert summary.interrupted and summary.in_both == 0 and summary.unchecked == 0, summary
    back, still = where()
    assert set(back) | set(still) == ids and max(back.values()) == 1 and max(still.values()) == 1, "nothing lost"
    assert len(set(back) & set(still)) <= summary.doubtful, summary
    assert summary.replayed <= len(back) <= summary.replayed + summary.doubtful, summary


def test_a_dead_letter_activemq_made_at_its_redelivery_limit_is_listed_as_broker_made_and_replayed(activemq,
                                                                                                  tmp_path: Path):
    s = settings_for(activemq)
    (dlq_name,) = [q for q in dead_letter_queues(s) if q.startswith("DLQ.")]
    dlq = ActiveMqDlq(s.cleanup.server)
    host, _, port = s.cleanup.stomp_hosts[0].rpartition(":")
    nacker = stomp.Connection12([(host, int(port))])
    nacks: list[str] = []

    class Nack(stomp.ConnectionListener):  # a consumer that fails on it, again and again
        def on_message(self, frame: Any) -> None:
            nacks.append(frame.headers["message-id"])
            nacker.nack(frame.headers["ack"])

    subscribed = threading.Event()
    nacker.set_listener("nack", Nack())
    nacker.set_listener("receipt", type("Receipt", (stomp.ConnectionListener,), {
        "on_receipt": lambda self, frame: subscribed.set()})())
    nacker.connect("guest", "guest", wait=True)
    # The virtual topic's consumer queue exists once ActiveMQ receipted the SUBSCRIBE.
    nacker.subscribe(f"/queue/{s.cleanup.consumer_queue}", id="nack", ack="client-individual",
                     headers={"receipt": "subscribed"})
    body = '{"event_type": "rule_ok", "payload": {"scope": "lst", "name": "x", "rule_id": "0"}}'
    try:
        assert subscribed.wait(20), "ActiveMQ did not receipt the SUBSCRIBE"
        send(s, body)
        wait_for(lambda: dlq.depth(dlq_name) == 1, timeout=90, what="ActiveMQ dead-lettered it past its limit")
    finally:
        nacker.disconnect()
    assert len(nacks) == 11, "1 delivery + maximumRedeliveries (10) of broker-config/activemq/activemq.xml"
    cfg = tmp_path / "c.toml"
    c = s.cleanup
    cfg.write_text(f'[broker]\nurls = ["{s.broker.urls[0]}"]\n[ingest]\nqueue = "{s.ingest.queue}"\n'
                   f'[cleanup]\nflavour = "activemq"\nstomp_hosts = ["{c.stomp_hosts[0]}"]\napp = "{c.app}"\n'
                   f'hermes_destination = "{c.hermes_destination}"\n')
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "injector.cli", "dlq", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    listed = cli("list", dlq_name, "--json")
    assert listed.returncode == 0, listed.stderr
    (dead,) = json.loads(listed.stdout)["messages"]
    assert dead["reason"] == "broker-redelivery-limit" and dead["source_queue"] == c.consumer_queue
    worker = cleanup_worker(s, FakeRucio())
    with running(worker):
        wait_for(lambda: worker.metrics.health()[0], timeout=20, what="subscribed")
        replayed = cli("replay", dlq_name, "--reason", "broker-redelivery-limit")
        assert replayed.returncode == 0, replayed.stderr
        wait_for(lambda: worker.stats.messages == 1, timeout=30, what="the replayed event consumed")
    assert worker.stats.outcomes.get("ignored-rule_ok") == 1 and dlq.depth(dlq_name) == 0
