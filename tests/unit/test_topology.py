import json
from pathlib import Path

import pytest

from injector import topology
from injector.config import parse

SHIPPED = Path(__file__).parents[2] / "broker-config" / "definitions.json"


def test_shipped_rabbitmq_definitions_are_the_declaration_for_the_default_config():
    generated = topology.definitions(topology.declare(parse({})), parse({}))
    assert json.loads(SHIPPED.read_text()) == generated, (
        "broker-config/definitions.json is stale: regenerate with `rucio-injector broker definitions`")


def test_each_role_gets_only_the_names_it_needs_and_no_password():
    s = parse({})
    roles = topology.permissions(s)
    daq, ingest = roles["daq"], roles["ingest"]
    assert (daq.configure, daq.write, daq.read) == ("^$", r"^(rucio\-injector\.daq)$", r"^(rucio\-injector\.archived)$")
    assert ingest.read == r"^(rucio\-injector\.ingest)$" and "amq\\.default" in ingest.write
    assert "rucio\\-injector\\.daq" not in ingest.write, "ingest publishes nothing to the DAQ"
    assert "rucio\\-injector\\.daq" in roles["cleanup"].write, "cleanup publishes file-archived"
    assert roles["hermes"] == topology.Permission("^$", r"^(amq\.topic)$", "^$")
    d = topology.definitions(topology.declare(s), s)
    assert [u["name"] for u in d["users"]] == [f"rucio-injector-{r}" for r in topology.ROLES]
    assert all(u["password_hash"] == "" for u in d["users"]), "passwords are set at deploy, never shipped"


def test_the_daqs_archived_queue_is_configurable_and_derived_from_the_ingest_queue_by_default():
    assert topology.archived_queue(parse({"ingest": {"queue": "orm.ingest"}})) == "orm.archived"
    s = parse({"broker": {"archived_queue": "lst-daq.inbox"}})
    assert topology.archived_queue(s) == "lst-daq.inbox"
    assert topology.Binding("rucio-injector.daq", "lst-daq.inbox", "file.archived.#") in topology.declare(s).bindings
    assert topology.permissions(s)["daq"].read == r"^(lst\-daq\.inbox)$"


def test_every_work_queue_is_quorum_with_delivery_limit_and_its_own_dead_letter_queue():
    decl = topology.declare(parse({"broker": {"delivery_limit": 7}}))
    q = decl.queue("rucio-injector.ingest")
    assert q.arguments["x-queue-type"] == "quorum" and q.arguments["x-delivery-limit"] == 7
    assert q.arguments["x-dead-letter-exchange"] == "rucio-injector.dlx"
    assert q.arguments["x-dead-letter-strategy"] == "at-least-once"
    dlq = decl.queue("rucio-injector.ingest.dlq")
    assert topology.Binding("rucio-injector.dlx", dlq.name, q.name) in decl.bindings


def test_vhost_comes_from_the_broker_url():
    assert topology.vhost_of("amqp://u:p@h:5672/daq") == "daq"
    assert topology.vhost_of("amqp://u:p@h:5672//") == "/"
    assert topology.vhost_of("amqp://h") == "/"


@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("file.closed.#", "file.closed.ORM.LST1", True), ("file.closed.#", "file.closed", True),
    ("file.closed.#", "file.archived.ORM.LST1", False), ("file.*.ORM.*", "file.closed.ORM.LST1", True),
    ("file.*.ORM.*", "file.closed.ORM", False), ("#", "anything.at.all", True), ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.c.z", True), ("a.#.z", "a.b.c", False), ("*", "a.b", False), ("a.b", "a.b", True),
])
def test_topic_matching_is_rabbitmqs(pattern: str, key: str, matches: bool) -> None:
    assert topology.topic_matches(pattern, key) is matches


def test_routes_send_each_routing_key_where_the_declared_bindings_send_it() -> None:
    s = parse({"ingest": {"queue": "site.ingest", "binding": "file.closed.ORM.#"}})
    routes = topology.Routes(s)
    daq = s.broker.daq_exchange
    assert routes.queues(daq, "file.closed.ORM.LST1") == ["site.ingest"]
    assert routes.queues(daq, "file.archived.ORM.LST1") == ["site.archived"]
    assert routes.queues(daq, "file.closed.LP.LST1") == []  # unroutable: the publisher refuses it
    assert routes.queues("", "any.queue") == ["any.queue"]  # the default exchange names the queue
    assert routes.queues(s.broker.dead_letter_exchange, "site.ingest") == ["site.ingest.dlq"]
    assert routes.queues("nope", "file.closed.ORM.LST1") == []


def test_dead_letters_live_by_the_broker_convention() -> None:
    rabbit = parse({})
    amq = parse({"broker": {"urls": ["stomp://u:p@amq:61613"]}, "cleanup": {
        "flavour": "activemq", "hermes_destination": "/topic/VirtualTopic.rucio.events"}})
    assert topology.dead_letters_of(rabbit, "rucio-injector.ingest") == "rucio-injector.ingest.dlq"
    assert topology.dead_letters_of(amq, "rucio-injector.ingest") == "DLQ.rucio-injector.ingest"
    cleanup = amq.cleanup.consumer_queue
    assert topology.dead_letters_of(amq, cleanup) == f"DLQ.{cleanup}"
