from dataclasses import dataclass, field
from typing import Any

from injector.settle import Outcome, Route, settle
from injector.testing import MemorySession
from injector.transport.stomp import RETRIES, retry_delay_ms, to_delivery


@dataclass
class Frame:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)


ACTIVEMQ = {"message-id": "ID:b-1:1:1:1:1", "destination": "/queue/Consumer.app.VirtualTopic.rucio.events",
            "subscription": "cleanup-1", "ack": "ID:b-1:1:1:1:1", "redelivered": "true", "expires": "0",
            "priority": "4", "timestamp": "1795583042000", "persistent": "true", "content-length": "2",
            "event_type": "transfer-done", "AMQ_SCHEDULED_DELAY": "2000", "scheduledJobId": "ID:x", RETRIES: "2"}


def test_activemq_attempts_come_from_the_count_our_retry_copy_carries():
    d = to_delivery(Frame(b"{}", ACTIVEMQ), generation=3, flavour="activemq")
    assert d.attempts == 3 and d.redelivered and d.generation == 3
    assert d.ack_id == "ID:b-1:1:1:1:1" and d.message_id == "ID:b-1:1:1:1:1"


def test_a_first_activemq_delivery_is_attempt_one_even_when_the_broker_redelivered_it():
    headers = {k: v for k, v in ACTIVEMQ.items() if k != RETRIES}
    assert to_delivery(Frame(b"{}", headers), 1, "activemq").attempts == 1


def test_only_the_events_own_headers_are_kept_so_retries_and_dead_letters_do_not_inherit_frame_headers():
    d = to_delivery(Frame(b"{}", ACTIVEMQ), 1, "activemq")
    assert d.headers == {"event_type": "transfer-done"}  # a replayed dead letter starts counting afresh


def test_rabbitmq_attempts_come_from_the_quorum_queues_delivery_count():
    frame = Frame(b"{}", {"message-id": "T_cleanup@@session-1@@1", "ack": "T_1", "x-delivery-count": "2",
                          "destination": "/amq/queue/cleanup", "event_type": "deletion-done"})
    d = to_delivery(frame, 1, "rabbitmq")
    assert d.attempts == 3 and d.ack_id == "T_1" and d.headers["event_type"] == "deletion-done"


def test_the_last_allowed_activemq_attempt_is_dead_lettered_with_its_count():
    d = to_delivery(Frame(b"{}", ACTIVEMQ), 1, "activemq")
    session = MemorySession()
    settle(session, [(d, Outcome("retry", "rucio-unavailable", None, "rucio-unavailable", "503"))],
           Route("Consumer.app.VirtualTopic.rucio.events", "", delivery_limit=3))
    (m,) = session.dead_letters
    assert m.headers["dlq-attempts"] == 3 and "gave up after 3 deliveries" in m.headers["dlq-error"]
    assert not session.requeued and session.acked == [d]


def test_retry_delay_doubles_from_one_second_up_to_a_cap():
    assert [retry_delay_ms(n) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]
    assert retry_delay_ms(50) == 120_000


def test_a_rabbitmq_topic_frame_records_amq_topic_and_the_topic_as_its_exchange_and_routing_key():
    frame = Frame(b"{}", {"message-id": "T_1", "ack": "T_1", "destination": "/topic/rucio.events"})
    d = to_delivery(frame, 1, "rabbitmq")
    assert (d.exchange, d.routing_key) == ("amq.topic", "rucio.events")


def test_an_activemq_frame_records_the_consumer_queue_it_came_from_never_the_virtual_topic():
    d = to_delivery(Frame(b"{}", {**ACTIVEMQ, "original-destination": "/topic/VirtualTopic.rucio.events"}), 1,
                    "activemq")
    assert d.exchange == "/queue/Consumer.app.VirtualTopic.rucio.events" and "topic" not in d.routing_key
