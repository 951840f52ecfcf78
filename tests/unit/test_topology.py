import json
from pathlib import Path

from injector import topology
from injector.config import parse

SHIPPED = Path(__file__).parents[2] / "broker-config" / "definitions.json"


def test_shipped_rabbitmq_definitions_are_the_declaration_for_the_default_config():
    generated = topology.definitions(topology.declare(parse({})))
    assert json.loads(SHIPPED.read_text()) == generated, (
        "broker-config/definitions.json is stale: regenerate with `rucio-injector broker definitions`")


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
