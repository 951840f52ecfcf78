"""The demo's embedded broker: routing and the quorum-queue rules it copies from RabbitMQ.
Its protocols are tested against the project's real clients in tests/integration (test_amqp, test_cleanup_transport)."""

from __future__ import annotations

import pytest

from injector.testbed.broker import Broker, BrokerError, Message, _escape, _unescape, topic_matches


@pytest.mark.parametrize(("pattern", "key", "match"), [
    ("file.closed.#", "file.closed.ORM.LST1", True),
    ("file.closed.#", "file.closed", True),
    ("file.closed.#", "file.archived.ORM.LST1", False),
    ("file.*.ORM.*", "file.closed.ORM.LST1", True),
    ("file.*.ORM", "file.closed.ORM.LST1", False),
    ("#", "anything.at.all", True),
    ("rucio.events", "rucio.events", True),
    ("#.LST1", "file.closed.ORM.LST1", True),
])
def test_topic_matching_is_amqps(pattern, key, match):
    assert topic_matches(pattern, key) is match


def _broker_with_queue(limit: int | None = 2) -> Broker:
    b = Broker()
    b.declare_exchange("daq", "topic", passive=False)
    b.declare_exchange("dlx", "direct", passive=False)
    args = {"x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": "work"}
    if limit is not None:
        args["x-delivery-limit"] = limit
    b.declare_queue("work", args, passive=False)
    b.declare_queue("work.dlq", {}, passive=False)
    b.bind("work", "daq", "file.closed.#")
    b.bind("work.dlq", "dlx", "work")
    return b


def test_returned_messages_are_counted_and_dead_lettered_past_the_delivery_limit():
    b = _broker_with_queue(limit=2)
    assert b.publish("daq", "file.closed.ORM.LST1", b"x", {"headers": {"h": "v"}}) == 1
    q = b.queues["work"]
    for count in (1, 2):
        m = q.messages.popleft()
        b.give_back(q, [m])
        assert q.messages[0].headers() == {"h": "v", "x-delivery-count": count} and q.messages[0].redelivered
    b.give_back(q, [q.messages.popleft()])  # the third return is past the limit
    assert not q.messages
    (dead,) = b.queues["work.dlq"].messages
    assert dead.body == b"x" and dead.headers()["x-first-death-reason"] == "delivery_limit"


def test_given_back_messages_go_first_in_their_order():
    b = _broker_with_queue(limit=None)
    for body in (b"1", b"2", b"3"):
        b.publish("daq", "file.closed.x", body, {})
    q = b.queues["work"]
    taken = [q.messages.popleft(), q.messages.popleft()]
    b.give_back(q, taken)
    assert [m.body for m in q.messages] == [b"1", b"2", b"3"]


def test_unknown_names_and_inequivalent_redeclarations_are_refused_like_rabbitmq():
    b = _broker_with_queue()
    with pytest.raises(BrokerError, match="NOT_FOUND - no exchange 'nope'"):
        b.publish("nope", "k", b"", {})
    with pytest.raises(BrokerError, match="NOT_FOUND - no queue 'nope'"):
        b.declare_queue("nope", {}, passive=True)
    with pytest.raises(BrokerError, match="PRECONDITION_FAILED - inequivalent arguments for queue 'work'"):
        b.declare_queue("work", {"x-queue-type": "classic"}, passive=False)
    with pytest.raises(BrokerError, match="PRECONDITION_FAILED - inequivalent arg 'type'"):
        b.declare_exchange("daq", "direct", passive=False)
    assert b.publish("daq", "no.binding", b"", {}) == 0  # unroutable: the caller decides (mandatory)


def test_stomp_header_escaping_round_trips():
    text = "a:b\\c\nd\re"
    assert _escape(text) == "a\\cb\\\\c\\nd\\re" and _unescape(_escape(text)) == text


def test_a_message_keeps_its_headers_apart_from_the_count():
    m = Message(b"", {"headers": {"k": 1}}, "", "q")
    assert m.headers() == {"k": 1}
    m.returned = 3
    assert m.headers() == {"k": 1, "x-delivery-count": 3} and m.properties["headers"] == {"k": 1}
