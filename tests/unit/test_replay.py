import pytest

from injector import deadletter
from injector.deadletter import UnknownId, record, resolve, stable_id
from injector.topology import stomp_destination
from operations.dlq.replay import ReplaySummary, Target, amqp_target, replay_headers, stomp_target


def dead(queue="rucio-injector.ingest.dlq", **headers):
    h = deadletter.headers({"event-id": "e1", **headers.pop("original", {})}, reason="no-stream", error="x",
                           exchange=headers.pop("exchange", "rucio-injector.daq"),
                           routing_key=headers.pop("routing_key", "file.closed.ORM.LST1"),
                           queue=headers.pop("source", "rucio-injector.ingest"), attempts=1)
    return record(queue, b"{}", h, "5b0c1f2a-0000-4000-8000-000000000001")


def test_a_replay_goes_straight_back_into_the_queue_it_was_dead_lettered_from():
    assert amqp_target(dead()) == Target("", "rucio-injector.ingest")


def test_to_routes_through_the_original_exchange_with_the_given_routing_key():
    assert amqp_target(dead(), "file.closed.ORM.LST2") == Target("rucio-injector.daq", "file.closed.ORM.LST2")


def test_an_old_cleanup_dead_letter_with_a_stomp_destination_routes_through_amq_topic():
    r = dead("rucio-injector.cleanup.dlq", exchange="/topic/rucio.events", routing_key="/topic/rucio.events",
             source="rucio-injector.cleanup")
    assert amqp_target(r) == Target("", "rucio-injector.cleanup")
    assert amqp_target(r, "rucio.events") == Target("amq.topic", "rucio.events")


def test_without_a_recorded_source_queue_the_dlq_name_says_where_it_came_from():
    r = record("DLQ.Consumer.app.VirtualTopic.x", b"{}", {}, "ID:host-1:1:1:1:1")
    assert stomp_target(r) == Target("", "/queue/Consumer.app.VirtualTopic.x")
    assert amqp_target(record("q.dlq", b"{}", {"x-death": [{"reason": "delivery_limit"}]}, "m")) == Target("", "q")


@pytest.mark.parametrize("destination, address", [
    ("/topic/rucio.events", ("amq.topic", "rucio.events")), ("/exchange/daq/file.closed.x", ("daq", "file.closed.x")),
    ("/queue/q", ("", "q")), ("/amq/queue/q", ("", "q"))])
def test_rabbitmq_stomp_destinations_map_to_amqp_as_the_plugin_does(destination, address):
    assert stomp_destination(destination) == address


def test_a_replayed_copy_keeps_its_first_address_so_that_its_next_dead_letter_still_names_it():
    r = dead()
    h = replay_headers(r, amqp_target(r))
    assert h[deadletter.REPLAY_COUNT] == 1 and [k for k in h if k.startswith("dlq-")] == [deadletter.REPLAY_COUNT]
    again = deadletter.headers(h, reason="no-stream", error="x", exchange="", routing_key="rucio-injector.ingest",
                               queue="rucio-injector.ingest", attempts=1)
    assert (again[deadletter.EXCHANGE], again[deadletter.ROUTING_KEY]) == ("rucio-injector.daq", "file.closed.ORM.LST1")
    assert again[deadletter.REPLAY_COUNT] == 1 and deadletter.REPLAYED_EXCHANGE not in again


def test_broker_made_ids_become_digests_so_short_ids_tell_dead_letters_apart():
    a = stable_id("ID:vm-40597-1795956368275-5:2:-1:1:1", b"")
    b = stable_id("ID:vm-40597-1795956368275-5:2:-1:1:2", b"")
    assert a[:8] != b[:8] and stable_id("5b0c1f2a-x", b"") == "5b0c1f2a-x"
    assert stable_id("T_cleanup@@session-x@@1", b"") == stable_id("T_cleanup@@session-x@@1", b"{}")


def test_an_id_prefix_resolves_to_the_one_id_it_starts_and_an_ambiguous_one_names_the_candidates():
    ids = ["5b0c1f2a-1", "5b0c1f2a-2", "77aa"]
    assert resolve(("77",), ids) == ("77aa",) and resolve(("5b0c1f2a-1",), ids) == ("5b0c1f2a-1",)
    with pytest.raises(UnknownId, match="5b0c1f2a-1, 5b0c1f2a-2"):
        resolve(("5b0c",), ids)
    with pytest.raises(UnknownId, match="no dead letter"):
        resolve(("zz",), ids)


def test_a_summary_counts_each_selected_dead_letter_in_exactly_one_outcome():
    s = ReplaySummary("q.dlq")
    r = dead()
    for outcome in ("selected", "replayed", "selected", "failed"):
        s.count(r, outcome)
    assert (s.selected, s.replayed, s.failed) == (2, 1, 1) and not s.clean
    assert s.by_reason["no-stream"] == {"selected": 2, "replayed": 1, "failed": 1}
    assert "failed 1" in str(s)
