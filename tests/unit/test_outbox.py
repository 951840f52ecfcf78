"""The DAQ outbox without a broker: order, delete only after the confirm, a crash between confirm and delete, the
bound, events the broker answers for, one drain at a time; the drainer's retries and its log line per event."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from injector import exits
from injector.config import OutboxSettings, parse
from injector.errors import BrokerUnavailable, OutboxFull, PublishFailed
from injector.events import FileClosed
from injector.messages import Outgoing
from producers.drainer import Drainer
from producers.outbox import Outbox, depth_of
from producers.publish import DaqPublisher, outgoing

EXCHANGE = "t.daq"


def event(n: int) -> FileClosed:
    return FileClosed.create(site="ORM", instrument="LST1", path=f"/data/lst1/Run{n}.fits", size=n, adler32="00000001")


def messages(*ns: int, exchange: str = EXCHANGE) -> list[Outgoing]:
    return [outgoing(event(n), exchange) for n in ns]


@pytest.fixture
def settings(tmp_path: Path) -> OutboxSettings:
    return OutboxSettings(path=str(tmp_path / "state" / "outbox.sqlite"), max_events=10)


@pytest.fixture
def outbox(settings: OutboxSettings):
    box = Outbox(settings)
    yield box
    box.close()


class Broker:
    """Records what it confirmed; `refuse` fails the next publishes as a lost connection would."""

    def __init__(self) -> None:
        self.confirmed: list[list[str]] = []
        self.refuse = 0
        self.answer: dict[str, str] = {}  # message id → why the broker answers for it (unroutable)

    def __call__(self, batch: Sequence[Outgoing]) -> None:
        if self.refuse:
            self.refuse -= 1
            raise PublishFailed("broker connection lost while publishing")
        failed = {m.message_id or "": self.answer[m.message_id or ""] for m in batch if m.message_id in self.answer}
        self.confirmed.append([m.message_id or "" for m in batch if m.message_id not in failed])
        if failed:
            raise PublishFailed(f"{len(failed)} not accepted", failed=failed)


def ids(batch: Sequence[Outgoing]) -> list[str]:
    return [m.message_id or "" for m in batch]


def test_the_outbox_is_a_wal_file_written_with_full_sync(outbox, settings):
    assert outbox._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert Path(settings.file).exists() and depth_of(settings) == 0


def test_events_drain_oldest_first_in_batches_and_are_deleted_once_confirmed(outbox):
    first, second = messages(1, 2, 3), messages(4, 5)
    outbox.put(first)
    outbox.put(second)
    broker = Broker()
    done = outbox.drain(EXCHANGE, broker, batch=2)
    assert broker.confirmed == [ids(first[:2]), [ids(first)[2], ids(second)[0]], ids(second)[1:]]
    assert (done.sent, done.left, outbox.depth()) == (5, 0, 0)


def test_an_event_is_deleted_only_after_the_broker_confirmed_it(outbox):
    outbox.put(messages(1, 2))
    broker = Broker()
    broker.refuse = 1
    with pytest.raises(PublishFailed):
        outbox.drain(EXCHANGE, broker)
    assert outbox.depth() == 2 and broker.confirmed == []
    assert outbox.drain(EXCHANGE, broker).sent == 2 and outbox.depth() == 0


def test_a_crash_between_the_confirm_and_the_delete_sends_the_event_again_with_its_event_id(outbox, settings,
                                                                                          monkeypatch):
    outbox.put(messages(1))
    broker = Broker()

    def crash(_ids: object) -> None:
        raise SystemExit("killed after the confirm, before the delete")

    monkeypatch.setattr(outbox, "delete", crash)
    with pytest.raises(SystemExit):
        outbox.drain(EXCHANGE, broker)
    restarted = Outbox(settings)  # the next process on the same file
    try:
        assert restarted.drain(EXCHANGE, broker).sent == 1
    finally:
        restarted.close()
    assert broker.confirmed[0] == broker.confirmed[1]  # a duplicate, same event_id: ingest is idempotent
    assert depth_of(settings) == 0


def test_a_full_outbox_refuses_the_whole_batch_with_a_clear_error_and_drops_nothing(outbox, settings):
    outbox.put(messages(*range(8)))
    with pytest.raises(OutboxFull) as refused:
        outbox.put(messages(8, 9, 10))
    text = str(refused.value)
    assert settings.file in text and "8 event(s) wait" in text and "3 more refused" in text
    assert "publish --flush" in text and "max_events" in text
    assert outbox.depth() == 8
    outbox.put(messages(8, 9))  # what fits is taken
    assert outbox.depth() == 10
    assert exits.explain(refused.value) == (exits.BROKER, text)


def test_an_unroutable_event_stays_parked_without_holding_back_the_others_and_a_flush_tries_it_again(outbox,
                                                                                                  caplog):
    batch = messages(1, 2, 3)
    outbox.put(batch)
    broker = Broker()
    bad = ids(batch)[1]
    broker.answer[bad] = "unroutable: exchange 't.daq' has no queue bound for 'file.closed.ORM.LST1'"
    with caplog.at_level(logging.ERROR, "producers.outbox"):
        done = outbox.drain(EXCHANGE, broker)
    assert (done.sent, list(done.parked.values()), done.left) == (2, [broker.answer[bad]], 1)
    assert any(bad in r.getMessage() and "NOT accepted" in r.getMessage() for r in caplog.records)
    outbox.put(messages(4))
    assert outbox.drain(EXCHANGE, broker).sent == 1  # the parked one is passed by
    del broker.answer[bad]
    assert outbox.drain(EXCHANGE, broker, everything=True).sent == 1 and outbox.depth() == 0
    assert broker.confirmed[-1] == [bad]


def test_events_of_another_exchange_are_never_drained_to_this_one(outbox):
    outbox.put(messages(1, exchange="other.daq") + messages(2))
    broker = Broker()
    assert outbox.drain(EXCHANGE, broker).sent == 1
    assert outbox.depth() == 1 and outbox.depth(EXCHANGE) == 0 and outbox.depth("other.daq") == 1


def test_a_second_drain_of_the_same_file_waits_for_the_first_and_never_sends_its_rows(outbox, settings):
    outbox.put(messages(1, 2))
    other = Outbox(settings)  # another process's handle on the file
    seen = []

    def publish(batch: Sequence[Outgoing]) -> None:
        seen.append(other.drain(EXCHANGE, Broker()))  # while this drain holds the outbox
    try:
        outbox.drain(EXCHANGE, publish)
        assert seen[0].busy and seen[0].sent == 0
        assert other.drain(EXCHANGE, Broker()).sent == 0  # deleted by the first drain: nothing sent twice
    finally:
        other.close()


def test_the_drainer_logs_each_event_the_broker_confirmed_with_its_event_id(outbox, caplog, monkeypatch):
    e = event(7)
    outbox.put([outgoing(e, EXCHANGE)])
    drainer = Drainer(outbox, parse({"broker": {"daq_exchange": EXCHANGE}}).broker)
    monkeypatch.setattr(drainer, "_publish", Broker())
    with caplog.at_level(logging.INFO, "producers.drainer"):
        assert drainer.flush(0).sent == 1
    assert [(r.getMessage(), getattr(r, "event_id", None)) for r in caplog.records] == [
        ("announced /data/lst1/Run7.fits size=7 adler32=00000001", str(e.event_id))]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_publish_returns_at_once_with_the_broker_down_and_the_events_wait_in_the_outbox(settings):
    broker = parse({"broker": {"urls": [f"amqp://guest:guest@127.0.0.1:{closed_port()}//"],
                               "daq_exchange": EXCHANGE}}).broker
    with DaqPublisher(broker, outbox=settings, background=False, close_timeout=0) as daq:
        daq.publish([event(1), event(2)])
        assert daq.depth() == 2
        with pytest.raises(BrokerUnavailable):
            daq.flush(0)
        assert [e.path for e in daq.waiting()] == ["/data/lst1/Run1.fits", "/data/lst1/Run2.fits"]
    assert depth_of(settings) == 2


def test_the_outbox_section_has_defaults_and_a_path_in_the_xdg_state_directory(tmp_path, monkeypatch):
    s = parse({})
    assert s.outbox.max_events == 100_000
    assert s.outbox.file == os.path.join(os.environ["XDG_STATE_HOME"], "rucio-injector", "outbox.sqlite")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert s.outbox.file == os.path.expanduser("~/.local/state/rucio-injector/outbox.sqlite")
    assert "~" not in s.outbox.file
    assert parse({"outbox": {"path": str(tmp_path / "o.sqlite"), "max_events": 5}}).outbox.max_events == 5


def test_a_note_on_an_error_ends_its_one_line():
    exc = BrokerUnavailable("broker amqp://u:pw@h:5672// unreachable")
    exc.add_note("3 event(s) wait in the outbox /x/outbox.sqlite")
    code, line = exits.explain(exc) or (0, "")
    assert code == exits.BROKER and line.endswith("3 event(s) wait in the outbox /x/outbox.sqlite")
    assert "pw" not in line


def test_a_publisher_for_an_activemq_broker_without_the_topology_is_refused_at_once(tmp_path):
    from injector.config import OutboxSettings, parse
    from injector.errors import ConfigError
    from producers.publish import DaqPublisher

    s = parse({"broker": {"urls": ["stomp://u:p@127.0.0.1:61613"]}, "cleanup": {
        "flavour": "activemq", "hermes_destination": "/topic/VirtualTopic.rucio.events"}})
    with pytest.raises(ConfigError, match="DaqPublisher.of"):
        DaqPublisher(s.broker, outbox=OutboxSettings(path=str(tmp_path / "o.sqlite")), background=False)
    DaqPublisher.of(s.model_copy(update={"outbox": OutboxSettings(path=str(tmp_path / "o.sqlite"))}),
                    background=False, close_timeout=0).close()
