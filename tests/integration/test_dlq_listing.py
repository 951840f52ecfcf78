"""Inspecting a DLQ never changes it and never spends its redelivery budget (issue 11, section 2.3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import amqp
import kombu
import pytest

from injector import topology
from injector.cli import main
from operations.dlq import RabbitDlq
from tests.conftest import STREAMS
from tests.integration.rabbit import AMQP_URL, declared, unique_settings
from tests.integration.test_dlq import dlq_name, fill_dlq, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def settings() -> Any:
    with declared(unique_settings(STREAMS)) as s:
        yield s


def raw(s: Any, queue: str) -> list[amqp.Message]:
    """Every message of a queue as the broker hands it out (headers untouched), then put back."""
    with kombu.Connection(s.broker.urls[0]) as conn:
        ch = conn.channel()
        out = []
        while (m := ch.basic_get(queue, no_ack=False)) is not None:
            out.append(m)
        ch.close()
    return out


def test_dead_letter_queues_are_classic_queues_in_the_declaration():
    decl = topology.declare(unique_settings(STREAMS))
    for q in decl.queues:
        if q.name.endswith(topology.DLQ_SUFFIX):
            assert q.arguments == {"x-queue-type": "classic"}, q


def test_listing_twenty_five_times_keeps_every_dead_letter_with_its_headers_and_counts_nothing(
        settings, tmp_path, capsys):
    ids = fill_dlq(settings, 40)
    before = {m.properties["message_id"]: dict(m.properties["application_headers"])
              for m in raw(settings, dlq_name(settings))}
    cfg = write_config(settings, tmp_path / "c.toml")
    for n in range(25):
        assert main(["--config", str(cfg), "--log-level", "WARNING", "dlq", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert sorted(m["id"] for m in listed["messages"]) == sorted(ids), f"listing {n + 1}"
    after = raw(settings, dlq_name(settings))
    assert {m.properties["message_id"]: dict(m.properties["application_headers"]) for m in after} == before
    assert all("x-delivery-count" not in m.properties["application_headers"] for m in after)
    assert [m.properties["message_id"] for m in after] == ids, "each dead letter kept its place"


def test_a_quorum_dlq_with_rabbitmqs_4x_default_delivery_limit_loses_its_dead_letters_at_the_21st_listing():
    """What classic DLQs avoid: RabbitMQ >= 4.0 gives quorum queues x-delivery-limit 20 by default, and a
    DLQ has no dead-letter exchange of its own, so a returned message past the limit is dropped. This
    machine runs 3.10, where the limit must be set explicitly to see it."""
    queue = f"t-{uuid.uuid4().hex[:8]}.quorum-dlq"
    with kombu.Connection(AMQP_URL) as conn:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True, auto_delete=False,
                         arguments={"x-queue-type": "quorum", "x-delivery-limit": 20})
        ch.confirm_select()
        for i in range(5):
            ch.basic_publish(amqp.Message(b"{}", message_id=str(i), delivery_mode=2), exchange="", routing_key=queue)
    try:
        dlq = RabbitDlq(unique_settings(STREAMS).broker)
        assert [len(dlq.peek(queue)) for _ in range(21)] == [5] * 21
        assert dlq.peek(queue) == [], "the 21st return dropped them"
    finally:
        with kombu.Connection(AMQP_URL) as conn:
            conn.channel().queue_delete(queue)


def test_broker_setup_refuses_a_dlq_still_declared_as_a_quorum_queue_and_says_how_to_migrate():
    s = unique_settings(STREAMS)
    old = dlq_name(s)
    with kombu.Connection(AMQP_URL) as conn:
        conn.channel().queue_declare(old, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
    try:
        with kombu.Connection(AMQP_URL) as conn, pytest.raises(topology.TopologyMismatch) as err:
            topology.apply(conn, topology.declare(s))
        assert "classic" in str(err.value) and "broker-config/README.md" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        with kombu.Connection(AMQP_URL) as conn:
            topology.remove(conn, topology.declare(s))


def test_dlq_migrate_recreates_a_quorum_dlq_as_classic_keeping_every_dead_letter_once(tmp_path):
    s = unique_settings(STREAMS)
    decl = topology.declare(s)
    older = topology.Topology(decl.vhost, decl.exchanges, [
        topology.Queue(q.name, {"x-queue-type": "quorum"}) if q.name.endswith(topology.DLQ_SUFFIX) else q
        for q in decl.queues], decl.bindings)
    with kombu.Connection(AMQP_URL) as conn:
        topology.apply(conn, older)  # as an older version declared it
    try:
        ids = fill_dlq(s, 500)
        before = [(m.properties["message_id"], _headers(m), m.body) for m in raw(s, dlq_name(s))]
        cfg = write_config(s, tmp_path / "c.toml")
        env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(cfg)}
        refused = subprocess.run([sys.executable, "-m", "injector.cli", "broker", "setup"], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 3 and "dlq migrate" in refused.stderr, refused.stderr
        done = subprocess.run([sys.executable, "-m", "injector.cli", "dlq", "migrate"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "500 back" in done.stderr, done.stderr
        after = [(m.properties["message_id"], _headers(m), m.body) for m in raw(s, dlq_name(s))]
        assert sorted(after, key=str) == sorted(before, key=str) and sorted(i for i, _, _ in after) == sorted(ids)
        with kombu.Connection(AMQP_URL) as conn:
            topology.apply(conn, decl)  # declared as now: classic
            with pytest.raises(amqp.exceptions.NotFound):
                conn.channel().queue_declare(dlq_name(s) + ".migrating", passive=True)
    finally:
        with kombu.Connection(AMQP_URL) as conn:
            topology.remove(conn, decl)
            conn.channel().queue_delete(dlq_name(s) + ".migrating")


def _headers(m: amqp.Message) -> dict[str, Any]:
    return {k: v for k, v in m.properties["application_headers"].items() if k != "x-delivery-count"}
