import logging

from injector import deadletter
from injector.errors import ChecksumConflict, RucioUnavailable
from injector.messages import Delivery, Outgoing
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


def _archived(body: bytes) -> Outgoing:
    return Outgoing("rucio-injector.daq", "file.archived.ORM.LST1", body)


def test_messages_of_done_outcomes_are_published_before_the_ack_and_those_of_failures_never():
    s = MemorySession()
    ok, bad = delivery(b"ok"), delivery(b"bad")
    failed = Outcome("dead-letter", "checksum-conflict", "lst:/b", "checksum-conflict", "differs",
                     emit=(_archived(b"never"),))
    final = settle(s, [(ok, Outcome.done("archived", "lst:/a", emit=(_archived(b"sent"),))), (bad, failed)], ROUTE)
    assert [m.body for m in s.published] == [b"sent"]
    assert s.acked == [ok, bad] and [o.did for o in final] == ["lst:/a", "lst:/b"]


def test_when_the_emitted_messages_cannot_be_published_their_triggers_are_requeued_with_what_they_were():
    s = MemorySession(refuse_publish=True)
    emitting, plain = delivery(b"e"), delivery(b"p")
    final = settle(s, [(emitting, Outcome.done("archived", "lst:/a", emit=(_archived(b"x"),))),
                       (plain, Outcome.done("registered", "lst:/b"))], ROUTE)
    assert s.requeued == [emitting] and s.acked == [plain] and not s.published
    assert final[0] == Outcome("retry", "publish-failed", "lst:/a", None, None)
    assert final[1] == Outcome.done("registered", "lst:/b")


def test_a_dead_letter_the_broker_refuses_is_requeued_keeping_its_reason_and_error():
    s = MemorySession(refuse_publish=True)
    d = delivery(b"a")
    (final,) = settle(s, [(d, Outcome.failed(ChecksumConflict("differs"), "lst:/a"))], ROUTE)
    assert final == Outcome("retry", "dead-letter-failed", "lst:/a", "checksum-conflict", "differs")
    assert s.requeued == [d] and not s.acked


def test_a_dead_letter_keeps_the_delivery_exchange_content_type_and_the_did_of_its_outcome():
    s = MemorySession()
    d = Delivery(b"<x/>", {}, "daq.exchange", "file.closed.ORM.LST1", 7, False, "e9", "text/xml")
    last = Delivery(b"z", {"x-delivery-count": 4}, "daq.exchange", "k", 8, True, "e10", "application/json")
    outcomes = settle(s, [(d, Outcome("dead-letter", "no-stream", "lst:/d", None, None)),
                          (last, Outcome.failed(RucioUnavailable("down"), "lst:/z"))], ROUTE)
    first, second = s.dead_letters
    assert first.content_type == "text/xml" and first.headers[deadletter.EXCHANGE] == "daq.exchange"
    assert first.headers[deadletter.REASON] == "no-stream" and first.headers[deadletter.ERROR] == ""
    assert [(o.kind, o.label, o.did, o.reason) for o in outcomes] == [
        ("dead-letter", "no-stream", "lst:/d", None),
        ("dead-letter", "rucio-unavailable", "lst:/z", "rucio-unavailable")]
    assert second.headers[deadletter.REASON] == "rucio-unavailable"


def test_done_is_logged_at_info_and_everything_else_at_warning(caplog):
    s = MemorySession()
    with caplog.at_level(logging.INFO, logger="injector.settle"):
        settle(s, [(delivery(b"a"), Outcome.done("registered", "lst:/a")),
                   (delivery(b"b"), Outcome.failed(RucioUnavailable("503"), "lst:/b"))], ROUTE)
    assert [(r.levelno, r.getMessage().split()[0]) for r in caplog.records] == [
        (logging.INFO, "done"), (logging.WARNING, "retry")]
