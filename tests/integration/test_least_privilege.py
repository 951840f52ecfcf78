"""Least privilege on the real RabbitMQ: one user per role with exactly the permissions `topology.permissions`
ships in broker-config/definitions.json. The pipeline works as them (the DAQ publishes, ingest consumes and
dead-letters, ops lists and purges dead letters); the DAQ's user cannot read, purge, declare or dead-letter."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import amqp
import kombu
import pytest

from consumers.services import ingest_worker
from injector import topology
from injector.config import Settings
from injector.events import FileClosed, encode
from injector.messages import Outgoing
from injector.testing import FakeRucio
from injector.transport.amqp import Publisher, connection
from operations.dlq import dlq_for
from producers.publish import DaqPublisher
from tests.conftest import STREAMS
from tests.integration.rabbit import declared, rabbitmqctl, running, unique_settings, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def roles() -> Iterator[tuple[Settings, dict[str, Settings]]]:
    """A throw-away topology and one RabbitMQ user per role with its shipped permissions: the settings each role's
    process would run with (its own user and password in the broker URL)."""
    base = unique_settings(STREAMS, ingest={"batch_window": 0.05})
    users = {role: (f"t-{secrets.token_hex(4)}-{role}", secrets.token_hex(16)) for role in topology.ROLES}
    try:
        for role, p in topology.permissions(base).items():
            user, password = users[role]
            rabbitmqctl("add_user", user, password)
            rabbitmqctl("set_permissions", "-p", "/", user, p.configure, p.write, p.read)
        as_role = {role: base.model_copy(update={"broker": base.broker.model_copy(update={
            "urls": [f"amqp://{user}:{password}@127.0.0.1:5672//"]})}) for role, (user, password) in users.items()}
        with declared(base):  # `broker setup` as the administrator would run it
            yield base, as_role
    finally:
        for user, _ in users.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=120)


def ev(n: int, **over: Any) -> FileClosed:
    return FileClosed.create(**{"site": "ORM", "instrument": "LST1", "path": f"/data/lst1/run{n}.fits.fz",
                                "size": n, "adler32": f"{n:08x}", "night": "20261124", **over})


def test_each_role_does_its_work_with_its_shipped_permissions_and_the_daq_can_do_nothing_else(roles):
    base, as_role = roles
    with DaqPublisher(as_role["daq"].broker) as daq:  # the DAQ's user publishes file-closed
        daq.publish([ev(1), ev(2, instrument="NOSUCH")])
        assert daq.flush(10).left == 0
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    worker = ingest_worker(as_role["ingest"], rucio)  # ingest's user consumes, registers, dead-letters
    with running(worker):
        wait_for(lambda: worker.stats.messages == 2, what="both events settled")
    assert [name for _, _, name in rucio.pfns] == ["/data/lst1/run1.fits.fz"]
    dlq = topology.dead_letter_queue(base.ingest.queue)
    (dead,) = dlq_for(as_role["ops"], dlq).peek(dlq)  # ops' user lists the dead letter
    assert dead.reason == "no-stream"

    with kombu.Connection(as_role["daq"].broker.connect_urls[0]) as conn:  # and the DAQ's user can do no more
        for what in (lambda ch: ch.basic_get(base.ingest.queue), lambda ch: ch.queue_purge(base.ingest.queue),
                     lambda ch: ch.basic_get(dlq), lambda ch: ch.queue_purge(dlq),
                     lambda ch: ch.queue_declare(f"{base.ingest.queue}.mine", durable=True),
                     lambda ch: ch.queue_delete(base.ingest.queue)):
            with pytest.raises(amqp.exceptions.AccessRefused, match="ACCESS_REFUSED"):
                what(conn.channel())
    conn = connection(as_role["daq"].broker)
    try:  # publishing into the dead-letter exchange (forging a dead letter) is refused too
        with pytest.raises(Exception, match="ACCESS_REFUSED"):
            Publisher(conn).publish([Outgoing(base.broker.dead_letter_exchange, base.ingest.queue, encode(ev(3)), {},
                                              "forged-dead-letter")])
    finally:
        conn.release()
    assert dlq_for(as_role["ops"], dlq).purge(dlq) == 1  # ops' user may purge
