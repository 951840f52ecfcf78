from injector import deadletter
from injector.errors import ChecksumConflict, RucioUnavailable
from injector.settle import Outcome, Route, settle
from injector.testing import MemorySession, delivery

ROUTE = Route("rucio-injector.ingest", "rucio-injector.dlx", delivery_limit=5)


def test_done_is_acked_retry_is_requeued():
    s = MemorySession()
    a, b = delivery(b"a"), delivery(b"b")
    settle(s, [(a, Outcome.done("registered")), (b, Outcome.failed(RucioUnavailable("503")))], ROUTE)
    assert s.acked == [a] and s.requeued == [b] and not s.dead_letters


def test_permanent_failure_is_published_to_the_dead_letter_exchange_with_reason_then_acked():
    s = MemorySession()
    d = delivery(b'{"x":1}', message_id="e1", headers={"trace": "t"})
    settle(s, [(d, Outcome.failed(ChecksumConflict("differs"), "lst:/a"))], ROUTE)
    (m,) = s.dead_letters
    assert (m.exchange, m.routing_key, m.body, m.message_id) == ("rucio-injector.dlx", ROUTE.queue, d.body, "e1")
    assert m.headers[deadletter.REASON] == "checksum-conflict"
    assert m.headers[deadletter.ERROR] == "differs"
    assert m.headers[deadletter.ROUTING_KEY] == "file.closed.ORM.LST1"
    assert m.headers[deadletter.SOURCE_QUEUE] == ROUTE.queue
    assert m.headers[deadletter.ATTEMPTS] == 1 and m.headers[deadletter.REPLAY_COUNT] == 0
    assert m.headers["trace"] == "t" and not any(k.startswith("x-") for k in m.headers)
    assert s.acked == [d]


def test_retry_on_the_last_allowed_delivery_is_dead_lettered_by_us_with_our_reason():
    s = MemorySession()
    d = delivery(b"a", attempts=5)
    (final,) = settle(s, [(d, Outcome.failed(RucioUnavailable("still down")))], ROUTE)
    assert final.kind == "dead-letter"
    assert s.dead_letters[0].headers[deadletter.REASON] == "rucio-unavailable"
    assert "gave up after 5 deliveries" in s.dead_letters[0].headers[deadletter.ERROR]


def test_if_the_dead_letter_cannot_be_published_the_message_is_requeued_not_lost():
    s = MemorySession(refuse_publish=True)
    d = delivery(b"a")
    settle(s, [(d, Outcome.failed(ChecksumConflict("x")))], ROUTE)
    assert s.requeued == [d] and not s.acked


def test_long_error_text_is_truncated_in_the_header():
    h = deadletter.headers({}, reason="r", error="e" * 10_000, exchange="x", routing_key="k", queue="q", attempts=1)
    assert len(h[deadletter.ERROR]) == deadletter.MAX_ERROR_TEXT
