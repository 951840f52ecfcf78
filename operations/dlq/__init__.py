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

__all__ = ["ACTIVEMQ_DLQ_PREFIX", "ActiveMqDlq", "Dlq", "RabbitDlq", "activemq_dlq_name", "dead_letter_queues",
           "dlq_for", "export_line"]

ACTIVEMQ_DLQ_PREFIX = "DLQ."
Dlq = RabbitDlq | ActiveMqDlq


def dead_letter_queues(settings: Settings, queue: str | None = None) -> list[str]:
    """The DLQs to act on: all of the topology's, or the one named (work queue or DLQ name).
    With ActiveMQ for Rucio's events, its DLQ.<consumer queue> is one of them."""
    known = [q.name for q in topology.declare(settings).queues if q.name.endswith(topology.DLQ_SUFFIX)]
    activemq = activemq_dlq_name(settings)
    if activemq:
        known.append(activemq)
    if queue is None:
        return known
    if activemq and queue in (activemq, activemq.removeprefix(ACTIVEMQ_DLQ_PREFIX)):
        return [activemq]
    name = queue if queue.endswith(topology.DLQ_SUFFIX) else topology.dead_letter_queue(queue)
    if name not in known:
        raise ConfigError(f"{queue!r} is not a dead-letter queue of this config (known: {', '.join(known)})")
    return [name]


def activemq_dlq_name(settings: Settings) -> str | None:
    c = settings.cleanup
    return c.dead_letter_destination.removeprefix("/queue/") if c.flavour == "activemq" else None


def dlq_for(settings: Settings, queue: str) -> Dlq:
    """The tool for one dead-letter queue: ActiveMQ's DLQ.<queue> over STOMP, the rest over AMQP."""
    if queue == activemq_dlq_name(settings):
        return ActiveMqDlq(settings.cleanup)
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
