import contextlib

import pytest

from injector import deadletter
from injector.deadletter import Filter, UnknownId, record, resolve, stable_id
from injector.topology import stomp_destination
from operations.dlq import replay
from operations.dlq.replay import Replay, ReplaySummary, Target, amqp_target, replay_headers, stomp_target


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


# The one replay loop (`Replay`), on a broker in memory: what happens in which order, whatever the broker.

class Lost(ConnectionError):
    pass


class MemoryBroker:
    """An `Adapter` in memory: a DLQ of dead letters, copies published (`sent`), every step in `steps`."""

    lost = (Lost,)

    def __init__(self, n, *, refuse=(), lose_at_publish=None, lose_after_delivered=None, keeps=0, check_lost=False,
                 materialize=False):
        self.dlq = [dead_letter(i) for i in range(n)]
        self.read = 0
        self.steps = []
        self.sent = []
        self.refuse, self.lose_at_publish, self.lose_after = set(refuse), lose_at_publish, lose_after_delivered
        self.keeps, self.check_lost, self.materialize = keeps, check_lost, materialize
        self.waiting = []
        self.publishes = 0

    def session(self):
        return contextlib.nullcontext()

    def present(self):
        def reading():
            for r in list(self.dlq):
                self.read += 1
                yield r
        return len(self.dlq), reading()

    def deliver(self, selected):
        if not self.materialize:  # RabbitMQ: each is held as it is read
            yield from selected
            return
        self.waiting = list(selected)  # ActiveMQ: browsed first, then consumed
        delivered = 0
        while self.waiting:
            if delivered == self.lose_after:
                raise Lost("cut while consuming")
            delivered += 1
            yield self.waiting.pop(0)

    def unreached(self):
        return list(self.waiting)

    def target(self, r):
        return Target("", r.source_queue)

    def publish(self, records, target):
        self.publishes += 1
        self.steps.append(("publish", [r.id for r in records]))
        if self.lose_at_publish == self.publishes:
            self.sent += records[: len(records) // 2]  # some arrived, no answer came
            raise Lost("cut while publishing")
        self.sent += [r for r in records if r.id not in self.refuse]
        return ["no route" if r.id in self.refuse else None for r in records]

    def remove(self, records):
        self.steps.append(("remove", [r.id for r in records]))
        for r in records[self.keeps:]:
            self.dlq.remove(r)

    def remove_again(self, records):
        if self.check_lost:
            raise Lost("cut while checking")
        found = [r for r in records if r in self.dlq]
        for r in found:
            self.dlq.remove(r)
        return found, len(found)


def dead_letter(i, source="rucio-injector.ingest", reason="no-stream"):
    h = deadletter.headers({"event-id": f"e{i}"}, reason=reason, error="x", exchange="rucio-injector.daq",
                           routing_key="file.closed.ORM.LST1", queue=source, attempts=1)
    return record(f"{source}.dlq", f'{{"n": {i}}}'.encode(), h, f"5b0c1f2a-0000-4000-8000-{i:012d}", tag=(i, "json"))


def exactly_once(s):
    return s.replayed + s.failed + s.doubtful == s.selected


def test_a_replay_removes_each_dead_letter_only_after_the_broker_confirmed_its_copy():
    broker = MemoryBroker(450)
    s = Replay("q.dlq", Filter()).run(broker)
    assert (s.depth, s.seen, s.selected, s.replayed) == (450, 450, 450, 450) and s.clean and exactly_once(s)
    published: set[str] = set()
    for step, ids in broker.steps:
        if step == "publish":
            published |= set(ids)
        else:
            assert set(ids) <= published, "removed before its copy was confirmed"
    assert [len(ids) for step, ids in broker.steps if step == "publish"] == [200, 200, 50]
    assert not broker.dlq and len(broker.sent) == 450


def test_the_selection_takes_the_filter_and_the_limit_and_reads_no_further_than_the_limit():
    broker = MemoryBroker(10)
    broker.dlq[1:3] = [dead_letter(i, reason="checksum-conflict") for i in (101, 102)]
    s = Replay("q.dlq", Filter(reason="no-stream"), limit=3).run(broker)
    assert (s.seen, s.selected, s.replayed, broker.read) == (5, 3, 3, 5)
    assert [r.reason for r in broker.dlq[:2]] == ["checksum-conflict"] * 2 and len(broker.dlq) == 7


def test_a_limit_of_zero_selects_nothing():
    broker = MemoryBroker(3)
    s = Replay("q.dlq", Filter(), limit=0).run(broker)
    assert (s.selected, s.replayed, len(broker.dlq)) == (0, 0, 3) and not broker.steps


def test_a_dry_run_counts_the_selection_and_publishes_and_removes_nothing():
    broker = MemoryBroker(5, materialize=True)
    s = Replay("q.dlq", Filter(), dry_run=True).run(broker)
    assert (s.selected, s.replayed) == (5, 0) and s.clean and not broker.steps and len(broker.dlq) == 5


def test_a_refused_copy_leaves_its_dead_letter_and_counts_as_failed():
    broker = MemoryBroker(4)
    refused = broker.dlq[1].id
    broker.refuse.add(refused)
    s = Replay("q.dlq", Filter()).run(broker)
    assert (s.replayed, s.failed) == (3, 1) and not s.clean and exactly_once(s)
    assert [r.id for r in broker.dlq] == [refused] and s.errors == [f"{refused}: no route; left in q.dlq"]


def test_a_connection_lost_while_publishing_counts_the_copies_in_flight_doubtful_and_the_unsent_failed(monkeypatch):
    monkeypatch.setattr(replay, "FLUSH", 4)
    broker = MemoryBroker(10, lose_at_publish=2, materialize=True)
    s = Replay("q.dlq", Filter()).run(broker)
    assert (s.selected, s.replayed, s.doubtful, s.failed) == (10, 4, 4, 2) and exactly_once(s)
    assert s.interrupted and "cut while publishing" in s.interrupted
    assert len(broker.dlq) == 6, "only confirmed copies have their dead letter removed"
    assert {r.id for r in broker.sent} & {r.id for r in broker.dlq} <= {r.id for r in broker.dlq[:4]}


def test_a_connection_lost_while_reading_counts_what_was_read_and_not_sent_as_failed(monkeypatch):
    monkeypatch.setattr(replay, "FLUSH", 4)
    broker = MemoryBroker(10, lose_after_delivered=6, materialize=True)
    s = Replay("q.dlq", Filter()).run(broker)
    assert (s.selected, s.replayed, s.doubtful, s.failed) == (10, 4, 0, 6) and exactly_once(s)
    assert s.errors == ["6 selected dead letter(s) not reached before the connection was lost: still in q.dlq"]
    assert len(broker.dlq) == 6


def test_a_copy_never_shares_a_confirm_round_with_another_of_its_id():
    broker = MemoryBroker(3)
    broker.dlq.append(broker.dlq[0])  # the same event dead-lettered twice
    s = Replay("q.dlq", Filter()).run(broker)
    assert [len(ids) for step, ids in broker.steps if step == "publish"] == [3, 1] and s.replayed == 4


def test_copies_for_different_queues_go_in_rounds_of_one_target_each():
    broker = MemoryBroker(2)
    broker.dlq.append(dead_letter(7, source="rucio-injector.cleanup"))
    Replay("q.dlq", Filter()).run(broker)
    assert [len(ids) for step, ids in broker.steps if step == "publish"] == [2, 1]


def test_the_check_removes_again_what_the_broker_kept_and_counts_it():
    broker = MemoryBroker(5, keeps=2)  # the broker loses the first two removals of each round
    s = Replay("q.dlq", Filter()).run(broker)
    assert (s.replayed, s.resettled, s.in_both) == (5, 2, 0) and s.clean and not broker.dlq


def test_what_the_check_cannot_reach_is_counted_unchecked():
    broker = MemoryBroker(5, keeps=2, check_lost=True)
    s = Replay("q.dlq", Filter()).run(broker)
    assert (s.replayed, s.unchecked) == (5, 5) and not s.clean
    assert s.errors == ["could not check q.dlq after the replay: Lost: cut while checking"]


def test_a_rate_spreads_the_copies_over_time(monkeypatch):
    slept = []
    monkeypatch.setattr(replay.time, "sleep", slept.append)
    broker = MemoryBroker(9)
    s = Replay("q.dlq", Filter(), rate=3).run(broker)
    assert [len(ids) for step, ids in broker.steps if step == "publish"] == [3, 3, 3] and s.replayed == 9
    assert len(slept) == 3 and 2.0 < sum(slept[-1:]) <= 3.0
