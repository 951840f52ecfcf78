"""Dead-letter records: what operators see of our own dead letters and of the broker's (x-death)."""

import hashlib
from datetime import UTC, datetime

from injector import deadletter
from injector.deadletter import record, stable_id

BODY = b'{"event_id": "e1"}'


def rabbitmq_death(**over: object) -> dict:
    death = {"count": 3, "reason": "delivery_limit", "queue": "lst.ingest", "time": datetime(2026, 11, 29, 10, 0, 0),
             "exchange": "rucio-injector.daq", "routing-keys": ["file.closed.ORM.LST1"]}
    death.update(over)
    return {"x-death": [death, {"count": 1, "reason": "expired", "queue": "older"}]}


def test_a_dead_letter_rabbitmq_made_is_read_from_its_newest_x_death():
    r = record("lst.ingest.dlq", BODY, rabbitmq_death(), "e1", tag=7)
    assert (r.reason, r.error) == ("broker-delivery_limit", "dead-lettered by the broker after 3 deliveries")
    assert (r.exchange, r.routing_key, r.source_queue) == ("rucio-injector.daq", "file.closed.ORM.LST1", "lst.ingest")
    assert r.failed_at == datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)  # the broker's time is UTC
    assert (r.attempts, r.replay_count, r.id, r.message_id, r.body, r.tag) == (3, 0, "e1", "e1", BODY, 7)


def test_our_own_headers_win_over_an_x_death_the_message_also_carries():
    ours = deadletter.headers({}, reason="checksum-conflict", error="differs", exchange="daq", routing_key="rk",
                              queue="lst.ingest", attempts=2, now=datetime(2026, 11, 28, 9, 0, tzinfo=UTC))
    r = record("lst.ingest.dlq", BODY, {**rabbitmq_death(), **ours}, "e1")
    assert (r.reason, r.error, r.exchange, r.routing_key, r.source_queue, r.attempts) == (
        "checksum-conflict", "differs", "daq", "rk", "lst.ingest", 2)
    assert r.failed_at == datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def test_a_message_with_neither_says_unknown_and_nothing_else():
    r = record("q.dlq", BODY, {}, None)
    assert (r.reason, r.error, r.exchange, r.routing_key, r.source_queue, r.failed_at, r.attempts) == (
        "unknown", "", "", "", "", None, 0)
    assert r.id == hashlib.sha1(BODY).hexdigest()[:16]


def test_headers_drop_the_brokers_x_headers_keep_the_others_and_stamp_the_failure_time():
    now = datetime(2026, 11, 29, 10, 0, 1, 500, tzinfo=UTC)
    h = deadletter.headers({"x-delivery-count": 4, "trace": "t", deadletter.REPLAY_COUNT: 2}, reason="no-stream",
                           error="e" * deadletter.MAX_ERROR_TEXT, exchange="daq", routing_key="rk", queue="q",
                           attempts=5, now=now)
    assert "x-delivery-count" not in h and h["trace"] == "t"
    assert h[deadletter.FAILED_AT] == "2026-11-29T10:00:01.000500Z"
    assert h[deadletter.ERROR] == "e" * deadletter.MAX_ERROR_TEXT, "an error of exactly the limit is kept whole"
    assert h[deadletter.REPLAY_COUNT] == 2 and h[deadletter.ATTEMPTS] == 5
    longer = deadletter.headers({}, reason="r", error="e" * (deadletter.MAX_ERROR_TEXT + 1), exchange="x",
                                routing_key="k", queue="q", attempts=1)
    assert len(longer[deadletter.ERROR]) == deadletter.MAX_ERROR_TEXT and longer[deadletter.ERROR].endswith("...")
    assert datetime.strptime(longer[deadletter.FAILED_AT], "%Y-%m-%dT%H:%M:%S.%fZ")  # now, in that format


def test_ids_are_the_event_id_or_a_16_character_digest():
    assert stable_id("e1", BODY) == "e1"
    assert stable_id("ID:host-1234-1:1:1:1:1", BODY) == hashlib.sha1(b"ID:host-1234-1:1:1:1:1").hexdigest()[:16]
    assert stable_id(None, BODY) == hashlib.sha1(BODY).hexdigest()[:16]


def test_an_ambiguous_prefix_names_ten_candidates_and_says_there_are_more():
    import pytest

    from injector.deadletter import UnknownId, resolve

    ids = [f"ab{i:02d}" for i in range(12)]
    with pytest.raises(UnknownId) as err:
        resolve(("ab",), ids)
    assert str(err.value) == f"id prefix 'ab' is ambiguous: {', '.join(ids[:10])} …; give more characters"
    with pytest.raises(UnknownId) as err:
        resolve(("ab",), ids[:10])
    assert str(err.value).endswith(f"{ids[9]}; give more characters")
