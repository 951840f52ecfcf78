"""Dead-letter operations on RabbitMQ (AMQP) and ActiveMQ (STOMP): list, show, export, purge, replay — safely.

Which DLQs a config has, and the tool for each: `operations.dlq.rabbitmq` (the `<queue>.dlq` classic queues)
and `operations.dlq.activemq` (ActiveMQ's `DLQ.<queue>` of the cleanup consumer). Both promise the same:
listing changes nothing; a replay works only on the dead letters present when it started, republishes each
with a broker confirm BEFORE removing it, and its summary (`operations.dlq.replay.ReplaySummary`) counts where every
selected dead letter ended up.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from injector import topology
from injector.config import Settings
from injector.deadletter import Record
from injector.errors import ConfigError
from operations.dlq.activemq import ActiveMqDlq
from operations.dlq.rabbitmq import RabbitDlq

__all__ = ["ActiveMqDlq", "Dlq", "RabbitDlq", "dead_letter_queues", "dlq_for", "export_line"]

Dlq = RabbitDlq | ActiveMqDlq


def dead_letter_queues(settings: Settings, queue: str | None = None) -> list[str]:
    """The DLQs to act on: all of the config's, or the one named (work queue or DLQ name). RabbitMQ: the topology's
    `<queue>.dlq`; an ActiveMQ-only site: `DLQ.<ingest queue>`; with ActiveMQ for Rucio's events, its
    `DLQ.<cleanup consumer queue>` too."""
    known = _known(settings)
    if queue is None:
        return list(known)
    for dlq, work in known.items():
        if queue in (dlq, work):
            return [dlq]
    raise ConfigError(f"{queue!r} is not a dead-letter queue of this config (known: {', '.join(known)})")


def _known(settings: Settings) -> dict[str, str]:
    """Every DLQ of the config → the work queue it belongs to."""
    c = settings.cleanup
    if settings.broker.transport == "amqp":
        works = [q.name for q in topology.declare(settings).queues if q.arguments.get("x-dead-letter-exchange")]
    else:
        works = [settings.ingest.queue]
    if c.flavour == "activemq":
        works.append(c.consumer_queue)
    return {topology.dead_letters_of(settings, w): w for w in works}


def dlq_for(settings: Settings, queue: str) -> Dlq:
    """The tool for one dead-letter queue: ActiveMQ's DLQ.<queue> over STOMP (on hermes' broker for the cleanup's,
    on the DAQ broker for an ActiveMQ-only site's), RabbitMQ's over AMQP."""
    c = settings.cleanup
    if c.flavour == "activemq" and queue == topology.dead_letters_of(settings, c.consumer_queue):
        return ActiveMqDlq(c.server)
    if settings.broker.transport == "stomp":
        return ActiveMqDlq(settings.broker.stomp)
    return RabbitDlq(settings.broker)


def export_line(r: Record) -> str:
    """One JSON line: the record's summary, its headers and its body (text, or base64 if binary)."""
    data: dict[str, Any] = r.summary()
    data["headers"] = {k: v for k, v in r.headers.items() if not k.startswith("x-")}
    try:
        data["body"] = r.body.decode()
    except UnicodeDecodeError:
        data["body_base64"] = base64.b64encode(r.body).decode()
    return json.dumps(data, default=str)
