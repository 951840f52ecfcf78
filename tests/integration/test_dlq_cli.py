"""`rucio-injector dlq` as operators run it (a process, a terminal of 80 columns): odd text is shown as it
is, never read as markup; short ids; the replay summary as a table (issue 11, sections 2.4 and 2.6)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import kombu
import pytest

from consumers.services import ingest_worker
from injector import deadletter, topology
from injector.messages import Outgoing
from injector.transport.amqp import Publisher, connection
from producers.publish import DaqPublisher
from tests.conftest import STREAMS
from tests.integration.cli import run
from tests.integration.rabbit import declared, depth, running, unique_settings, wait_for
from tests.integration.test_dlq import dlq_name, fill_dlq, write_config

pytestmark = pytest.mark.integration

ODD = {
    "abcdef01-0000-4000-8000-000000000001": ("invalid-name", "Data identifier name [/bold] does not match "
                                             "^[/A-Za-z0-9][/A-Za-z0-9.\\-_]*$", b'{"path": "/data/[red]x[/red]"}'),
    "abcdef01-0000-4000-8000-000000000002": ("[red]odd-reason", "ünïcødé ✓ 日本語 " + "very long " * 500,
                                             b"\xff\xfe not utf-8 \x80"),
    "77777777-0000-4000-8000-000000000003": ("rucio-refused", "line one\nline two [bold]", b"{}"),
}


@pytest.fixture
def settings() -> Any:
    with declared(unique_settings(STREAMS)) as s:
        yield s


def dead_letters(s: Any) -> None:
    messages = []
    for mid, (reason, error, body) in ODD.items():
        h = deadletter.headers({}, reason=reason, error=error, exchange=s.broker.daq_exchange,
                               routing_key="file.closed.ORM.LST1", queue=s.ingest.queue, attempts=1)
        messages.append(Outgoing(s.broker.dead_letter_exchange, s.ingest.queue, body, h, mid))
    conn = connection(s.broker)
    try:
        Publisher(conn).publish(messages)
    finally:
        conn.release()


def cli(s: Any, tmp_path: Any, *args: str, columns: int = 80, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": str(columns), "RUCIO_INJECTOR_CONFIG": str(write_config(s, tmp_path / "c.toml"))}
    return run("--log-level", "WARNING", *args, env=env, expect=expect)


def test_list_at_80_columns_shows_one_line_per_dead_letter_with_short_ids_and_odd_text_as_it_is(settings, tmp_path):
    dead_letters(settings)
    out = cli(settings, tmp_path, "dlq", "list", settings.ingest.queue)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), out.stdout
    rows = [line for line in lines if line.startswith("│ ") and "failed (UTC)" not in line]
    assert sorted(r.split()[1] for r in rows) == ["77777777", "abcdef01", "abcdef01"], out.stdout
    assert "name [/bold" in out.stdout and "[red]odd-reason" in out.stdout and "ünïcødé ✓ 日本語" in out.stdout
    assert "line two [bold]" in out.stdout, "a multi-line error is one line"
    assert depth(settings, dlq_name(settings)) == 3


def test_json_has_full_ids_and_show_takes_a_prefix_and_shows_a_binary_body_as_base64(settings, tmp_path):
    dead_letters(settings)
    listed = json.loads(cli(settings, tmp_path, "dlq", "list", "--json").stdout)
    assert sorted(m["id"] for m in listed["messages"]) == sorted(ODD)
    shown = cli(settings, tmp_path, "dlq", "show", "abcdef01-0000-4000-8000-000000000002")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["reason"] == "[red]odd-reason" and "body_base64" in data and data["error"].startswith("ünïcødé")
    assert json.loads(cli(settings, tmp_path, "dlq", "show", "7777").stdout)["error"] == "line one\nline two [bold]"


def test_an_ambiguous_id_prefix_is_an_error_naming_the_candidates(settings, tmp_path):
    dead_letters(settings)
    for args in (("dlq", "show", "abcdef01"), ("dlq", "replay", "--id", "abcdef01", "--dry-run")):
        out = cli(settings, tmp_path, *args, expect=2)
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert "abcdef01-0000-4000-8000-000000000001, abcdef01-0000-4000-8000-000000000002" in out.stderr
    out = cli(settings, tmp_path, "dlq", "show", "zzzz", expect=2)
    assert "no dead letter" in out.stderr and len(out.stderr.splitlines()) == 1


def test_the_replay_summary_is_a_table_per_queue_and_reason_at_80_columns(settings, tmp_path):
    dead_letters(settings)
    fill_dlq(settings, 5, reason="no-stream")
    out = cli(settings, tmp_path, "dlq", "replay", settings.ingest.queue, "--reason", "no-stream")
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 80 for line in out.stderr.splitlines()), out.stderr
    assert f"{dlq_name(settings)}: looked at 8 of the 8 present at the start" in out.stderr
    (total,) = [line for line in out.stderr.splitlines() if "total" in line]
    assert [c.strip() for c in total.split("│")[1:-1]] == ["total", "5", "5", "0"], out.stderr
    assert "{" not in out.stderr, "no Python dict repr"
    odd = cli(settings, tmp_path, "dlq", "replay", "--reason", "[red]odd-reason", "--dry-run")
    assert odd.returncode == 0 and "[red]odd-reason" in odd.stderr, odd.stderr
    assert depth(settings, dlq_name(settings)) == 3


def test_a_dead_letter_rabbitmq_made_at_its_delivery_limit_is_listed_as_broker_made_and_replayed_into_rucio(
        lab, tmp_path):
    from tests.integration.test_ingest_rucio import files, settings_for

    s = settings_for(lab, broker={"delivery_limit": 2})
    (event,) = files(lab, 1)
    with declared(s):
        with DaqPublisher(s.broker) as daq:
            daq.publish([event])
        with kombu.Connection(s.broker.urls[0]) as conn:  # a consumer that crashes on it, again and again
            ch = conn.channel()
            for _ in range(10):
                msg = ch.basic_get(s.ingest.queue, no_ack=False)
                if msg is None:
                    break
                ch.basic_reject(msg.delivery_tag, requeue=True)
        wait_for(lambda: depth(s, topology.dead_letter_queue(s.ingest.queue)) == 1, timeout=10,
                 what="RabbitMQ dead-lettered it past its delivery limit")
        listed = cli(s, tmp_path, "dlq", "list", s.ingest.queue, "--json")
        assert listed.returncode == 0, listed.stderr
        (dead,) = json.loads(listed.stdout)["messages"]
        assert dead["reason"] == "broker-delivery_limit" and dead["source_queue"] == s.ingest.queue
        assert dead["event_id"] == str(event.event_id) and "dead-lettered by the broker" in dead["error"]
        replayed = cli(s, tmp_path, "dlq", "replay", s.ingest.queue, "--reason", "broker-delivery_limit")
        assert replayed.returncode == 0, replayed.stderr
        assert depth(s, topology.dead_letter_queue(s.ingest.queue)) == 0
        ingested_now = ingest_worker(s)
        with running(ingested_now):
            wait_for(lambda: ingested_now.stats.messages == 1, what="the replayed event ingested")
    assert ingested_now.stats.outcomes.get("registered") == 1
    assert lab.replicas([event.path])[event.path]["adler32"] == event.adler32
