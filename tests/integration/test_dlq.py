"""Dead-letter operations on the real RabbitMQ (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from consumers.services import ingest_worker
from injector import deadletter, topology
from injector.config import parse
from injector.deadletter import Filter
from injector.events import FileClosed, encode
from injector.messages import Outgoing
from injector.testing import FakeRucio
from injector.transport.amqp import Publisher, connection
from operations.dlq import RabbitDlq, dead_letter_queues
from producers.publish import DaqPublisher
from tests.conftest import STREAMS
from tests.integration.rabbit import declared, depth, get_all, running, unique_settings, wait_for

pytestmark = pytest.mark.integration


def ev(n: int, instrument: str = "LST1") -> FileClosed:
    return FileClosed.create(site="ORM", instrument=instrument, path=f"/data/lst1/run{n:05d}.fits.fz", size=n,
                             adler32=f"{n:08x}", night="20261124")


@pytest.fixture
def settings():
    with declared(unique_settings(STREAMS, ingest={"batch_window": 0.05})) as s:
        yield s


def dlq_name(s):
    return topology.dead_letter_queue(s.ingest.queue)


def fill_dlq(s, n: int, *, reason: str = "no-stream", failed_at: datetime | None = None, instrument: str = "LST1"):
    """Dead letters as the ingest consumer writes them, straight into the DLQ."""
    messages = []
    for i in range(n):
        e = ev(i + 1, instrument)
        h = deadletter.headers({"event-id": str(e.event_id)}, reason=reason, error="test",
                               exchange=s.broker.daq_exchange, routing_key=e.routing_key, queue=s.ingest.queue,
                               attempts=1, now=failed_at)
        messages.append(Outgoing(s.broker.dead_letter_exchange, s.ingest.queue, encode(e), h, str(e.event_id)))
    conn = connection(s.broker)
    try:
        Publisher(conn).publish(messages)
    finally:
        conn.release()
    return [m.message_id for m in messages]


def test_poison_event_is_dead_lettered_then_replayed_after_the_config_is_fixed(settings):
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    with DaqPublisher(settings.broker) as daq:
        daq.publish([ev(1, instrument="LST2").model_copy(update={"path": "/data/lst2/run00001.fits.fz"})])
    worker = ingest_worker(settings, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == 1)
    (dead,) = RabbitDlq(settings.broker).peek(dlq_name(settings))
    assert dead.reason == "no-stream" and "instrument='LST2'" in dead.error
    # the operator adds the missing stream, then replays
    fixed = json.loads(json.dumps(STREAMS))
    fixed["streams"].append({**fixed["streams"][0], "name": "lst2-raw", "instrument": "LST2",
                             "storage_root": "/data/lst2"})
    fixed_settings = parse({**fixed, "broker": settings.broker.model_dump(), "ingest": settings.ingest.model_dump()})
    summary = RabbitDlq(settings.broker).replay(dlq_name(settings))
    assert (summary.selected, summary.replayed, summary.failed) == (1, 1, 0)
    worker = ingest_worker(fixed_settings, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == 1)
    assert worker.stats.outcomes == {"registered": 1}
    assert ("ORM-BUFFER", "lst", "/data/lst2/run00001.fits.fz") in rucio.pfns
    assert depth(settings, dlq_name(settings)) == 0


def test_list_and_show_leave_every_message_in_place(settings):
    ids = fill_dlq(settings, 5)
    dlq = RabbitDlq(settings.broker)
    first = [r.id for r in dlq.peek(dlq_name(settings))]
    second = [r.id for r in dlq.peek(dlq_name(settings))]
    assert sorted(first) == sorted(second) == sorted(ids)
    assert [r.id for r in dlq.peek(dlq_name(settings), Filter(ids=(ids[2],)))] == [ids[2]]
    assert depth(settings, dlq_name(settings)) == 5


def test_filters_select_exactly_the_intended_messages(settings):
    old = fill_dlq(settings, 3, reason="no-stream", failed_at=datetime.now(UTC) - timedelta(days=2))
    new = fill_dlq(settings, 2, reason="checksum-conflict")
    lst2 = fill_dlq(settings, 1, reason="no-stream", instrument="LST2")
    dlq, q = RabbitDlq(settings.broker), dlq_name(settings)

    def ids(f):
        return sorted(r.id for r in dlq.peek(q, f))

    assert ids(Filter(reason="checksum-conflict")) == sorted(new)
    assert ids(Filter(older_than=timedelta(days=1))) == sorted(old)
    assert ids(Filter(newer_than=timedelta(hours=1))) == sorted(new + lst2)
    assert ids(Filter(match=(("instrument", "LST2"),))) == sorted(lst2)
    assert ids(Filter(reason="no-stream", match=(("size", "2"),))) == sorted([old[1]])


def test_dry_run_changes_nothing(settings):
    fill_dlq(settings, 4)
    s = RabbitDlq(settings.broker).replay(dlq_name(settings), dry_run=True)
    assert (s.selected, s.replayed) == (4, 0)
    assert depth(settings, dlq_name(settings)) == 4 and depth(settings, settings.ingest.queue) == 0


def test_replay_republishes_body_untouched_with_replay_count_and_only_selected(settings):
    fill_dlq(settings, 3, reason="no-stream")
    fill_dlq(settings, 2, reason="checksum-conflict")
    s = RabbitDlq(settings.broker).replay(dlq_name(settings), Filter(reason="checksum-conflict"), limit=1)
    assert s.replayed == 1
    (m,) = get_all(settings, settings.ingest.queue)
    h = m.properties["application_headers"]
    assert h[deadletter.REPLAY_COUNT] == 1 and deadletter.REASON not in h
    assert json.loads(m.body)["schema"] == "file-closed/1"
    reasons = sorted(r.reason for r in RabbitDlq(settings.broker).peek(dlq_name(settings)))
    assert reasons == ["checksum-conflict"] + ["no-stream"] * 3


def test_purge_needs_a_filter_match_and_deletes_only_those(settings):
    fill_dlq(settings, 2, reason="no-stream")
    keep = fill_dlq(settings, 1, reason="checksum-conflict")
    assert RabbitDlq(settings.broker).purge(dlq_name(settings), Filter(reason="no-stream")) == 2
    assert [r.id for r in RabbitDlq(settings.broker).peek(dlq_name(settings))] == keep


def test_unknown_queue_is_a_clear_error(settings):
    with pytest.raises(Exception, match="not a dead-letter queue"):
        dead_letter_queues(settings, "nope")


def write_config(s, path):
    b, i, c = s.broker, s.ingest, s.cleanup
    path.write_text(
        f'[broker]\nurls = ["{b.urls[0]}"]\ndaq_exchange = "{b.daq_exchange}"\n'
        f'dead_letter_exchange = "{b.dead_letter_exchange}"\n[ingest]\nqueue = "{i.queue}"\n'
        f'[cleanup]\nqueue = "{c.queue}"\nhermes_destination = "{c.hermes_destination}"\n')
    return path


def test_sigkill_during_a_replay_of_a_thousand_loses_nothing(settings, tmp_path):
    ids = set(fill_dlq(settings, 1000))
    cfg = write_config(settings, tmp_path / "c.toml")
    proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "--config", str(cfg), "dlq", "replay",
                             "--rate", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(lambda: depth(settings, settings.ingest.queue) >= 200, timeout=30, what="replay under way")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL, "the replay had ended before the kill"
    # The broker requeues the killed channel's unacked dead letters a moment after the socket closes.
    wait_for(lambda: depth(settings, settings.ingest.queue) + depth(settings, dlq_name(settings)) >= 1000,
             timeout=10, what="the killed channel's unacked messages back in the DLQ")
    back = {m.properties["message_id"] for m in get_all(settings, settings.ingest.queue)}
    still = {r.id for r in RabbitDlq(settings.broker).peek(dlq_name(settings))}
    assert 200 <= len(back) < 1000, "the kill should land mid-replay"
    assert back | still == ids
