"""A dead letter of the cleanup consumer, replayed with `rucio-injector dlq replay`, releases its source:
end to end on the real Rucio, on RabbitMQ-STOMP and on ActiveMQ (issue 11, section 2.2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from consumers.services import cleanup_worker
from injector.config import Settings
from injector.errors import RucioUnavailable
from injector.testing import FakeRucio
from operations.dlq import dead_letter_queues, dlq_for
from tests.integration.cli import run
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import declared, ingested, running, wait_for
from tests.integration.test_cleanup_rucio import (
    broker,
    cleanup_running,
    cleanup_settings,
    flavour,
    hermes_for,
    outcomes,
)
from tests.integration.test_ingest_rucio import files, stream_toml

pytestmark = pytest.mark.integration
__all__ = ["broker", "flavour"]  # fixtures used here


def config_toml(s: Settings, lab: Lab, path: Path) -> Path:
    b, c = s.broker, s.cleanup
    path.write_text(
        f'[broker]\nurls = ["{b.urls[0]}"]\ndaq_exchange = "{b.daq_exchange}"\n'
        f'dead_letter_exchange = "{b.dead_letter_exchange}"\ndelivery_limit = {b.delivery_limit}\n'
        f'[ingest]\nqueue = "{s.ingest.queue}"\n'
        f'[cleanup]\nflavour = "{c.flavour}"\nstomp_hosts = ["{c.stomp_hosts[0]}"]\n'
        f'hermes_destination = "{c.hermes_destination}"\nqueue = "{c.queue}"\napp = "{c.app}"\n'
        + stream_toml(lab))
    return path


def cleanup_dlq(s: Settings) -> str:
    (name,) = dead_letter_queues(s, s.cleanup.consumer_queue)
    return name


def dead_lettered_while_rucio_was_down(s: Settings, lab: Lab, names: list[str]) -> None:
    """hermes delivers the transfer-done events while the cleanup consumer cannot reach Rucio: after
    `delivery_limit` deliveries each is dead-lettered as rucio-unavailable, its source kept."""
    down = FakeRucio()
    down.fail("replicas", RucioUnavailable("Rucio is down (test)"), times=10_000)
    worker = cleanup_worker(s, down)
    worker.batching.retry_pause = 0.2
    with running(worker):
        wait_for(lambda: worker.metrics.health()[0], timeout=30, what="cleanup subscribed")
        lab.server.run_daemons("hermes", rses=[SOURCE, ARCHIVE], hermes=hermes_for(s))
        wait_for(lambda: len(transfers_done(s, names)) == 2, timeout=90,
                 what="both transfer-done events dead-lettered")


def transfers_done(s: Settings, names: list[str]) -> list[Any]:
    q = cleanup_dlq(s)
    return [r for r in dlq_for(s, q).peek(q)
            if r.field("event_type") == "transfer-done" and r.field("payload.name") in names]


def test_a_dead_lettered_transfer_done_replayed_with_the_cli_releases_its_source(lab, broker, tmp_path):
    s = cleanup_settings(lab, broker)
    events = files(lab, 2)
    names = [e.path for e in events]
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(config_toml(s, lab, tmp_path / "c.toml"))}
    with declared(s):
        ingested(s, events)
        lab.discard_rucio_events()  # only this test's transfer-done events reach its topic
        lab.server.run_daemons("judge-evaluator", "submitter", "poller", "finisher", rses=[SOURCE, ARCHIVE])
        assert all(lab.replicas([n])[n]["states"].get(ARCHIVE) == "AVAILABLE" for n in names)
        dead_lettered_while_rucio_was_down(s, lab, names)
        q = cleanup_dlq(s)
        dead = transfers_done(s, names)
        assert {r.reason for r in dead} == {"rucio-unavailable"}, [r.summary() for r in dlq_for(s, q).peek(q)]
        assert all(r.source_queue == s.cleanup.consumer_queue for r in dead)
        assert all(SOURCE in lab.replicas([n])[n]["states"] for n in names), "nothing released yet"

        dry = cli(env, "dlq", "replay", q, "--reason", "rucio-unavailable", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"to {_where(s)}" in dry.stderr and "/topic/" not in dry.stderr.replace(s.cleanup.hermes_destination, "")
        with cleanup_running(s) as workers:
            done = cli(env, "dlq", "replay", q, "--reason", "rucio-unavailable")
            assert done.returncode == 0, done.stdout + done.stderr
            wait_for(lambda: outcomes(workers, "released") == 2, timeout=60, what="both sources released")
        assert dlq_for(s, q).peek(q) == []
    lab.server.run_daemons("reaper", rses=[SOURCE])
    for e in events:
        assert SOURCE not in lab.replicas([e.path])[e.path]["states"], "the source replica was not deleted"
        assert not Path(e.path).exists()


def _where(s: Settings) -> str:
    """How the replay names its target: the consumer queue itself, never the topic."""
    c = s.cleanup
    return f"queue {c.queue} (default exchange)" if c.flavour == "rabbitmq" else f"/queue/{c.consumer_queue}"


def cli(env: dict[str, str], *args: str) -> Any:
    return run(*args, env=env)
