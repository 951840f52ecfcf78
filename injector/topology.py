"""The broker topology, declared once.

`declare(settings)` is the single declaration. `broker setup` applies it idempotently over AMQP
(`apply`), and broker-config/definitions.json is the same declaration rendered as RabbitMQ
definitions (`definitions`); a test keeps the shipped file equal to the rendering.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

from injector.config import Settings
from injector.errors import InjectorError

DLQ_SUFFIX = ".dlq"
# Dead-letter queues are CLASSIC durable queues, by design: an operator reads them with basic.get and puts
# the messages back, and a classic queue keeps each message's place and counts nothing, while a quorum queue
# counts every return in x-delivery-count and, from RabbitMQ 4.0 on, drops a message returned more than
# 20 times (the default delivery limit; a DLQ has no dead-letter exchange of its own). Listing must never
# spend a budget. Classic queues are not replicated: a DLQ holds what a person looks at, not the flow.
DLQ_ARGUMENTS = {"x-queue-type": "classic"}
ACTIVEMQ_DLQ_PREFIX = "DLQ."  # ActiveMQ: dead letters of queue Q are in DLQ.Q (broker-config/activemq/activemq.xml)


class TopologyMissing(InjectorError):
    """A queue or exchange the command needs does not exist on the broker (`broker setup` was not run)."""


class TopologyMismatch(InjectorError):
    """The broker has a queue or exchange of ours declared with other arguments than the declaration."""


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str = "topic"


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    vhost: str
    exchanges: list[Exchange]
    queues: list[Queue]
    bindings: list[Binding]

    def queue(self, name: str) -> Queue:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)


def dead_letter_queue(queue: str) -> str:
    return queue + DLQ_SUFFIX


def activemq_dead_letter_queue(queue: str) -> str:
    return ACTIVEMQ_DLQ_PREFIX + queue


def dead_letters_of(settings: Settings, queue: str) -> str:
    """The dead-letter queue of one of our work queues, by where it lives: `<queue>.dlq` on RabbitMQ, `DLQ.<queue>`
    on ActiveMQ (an ActiveMQ-only site's queues; the cleanup's consumer queue on hermes' ActiveMQ)."""
    c = settings.cleanup
    on_activemq = settings.broker.transport == "stomp" or (c.flavour == "activemq" and queue == c.consumer_queue)
    return activemq_dead_letter_queue(queue) if on_activemq else dead_letter_queue(queue)


def archived_queue(settings: Settings) -> str:
    """The DAQ's inbox for file-archived events ([broker] archived_queue; a DAQ may also bind its own queue)."""
    return settings.broker.archived_queue or settings.ingest.queue.rsplit(".", 1)[0] + ".archived"


def declare(settings: Settings) -> Topology:
    """Every exchange, queue and binding the project needs, from the settings."""
    b = settings.broker
    exchanges = [Exchange(b.daq_exchange, "topic"), Exchange(b.dead_letter_exchange, "direct")]
    queues: list[Queue] = []
    bindings: list[Binding] = []

    def work_queue(name: str, exchange: str, routing_key: str) -> None:
        queues.append(Queue(name, _work_arguments(settings, name)))
        queues.append(Queue(dead_letter_queue(name), dict(DLQ_ARGUMENTS)))
        bindings.append(Binding(exchange, name, routing_key))
        bindings.append(Binding(b.dead_letter_exchange, dead_letter_queue(name), name))

    work_queue(settings.ingest.queue, b.daq_exchange, settings.ingest.binding)
    if settings.cleanup.flavour == "rabbitmq":
        # hermes publishes over STOMP to /topic/<name>: RabbitMQ routes that through amq.topic,
        # so a durable queue bound there keeps every event even while no cleanup consumer runs.
        work_queue(settings.cleanup.queue, "amq.topic", settings.cleanup.topic)
    inbox = archived_queue(settings)
    queues.append(Queue(inbox, {"x-queue-type": "quorum"}))
    bindings.append(Binding(b.daq_exchange, inbox, "file.archived.#"))
    return Topology(vhost_of(b.urls[0]), exchanges, queues, bindings)


def _work_arguments(settings: Settings, name: str) -> dict[str, Any]:
    # Quorum: replicated, poison-message protection through the delivery limit; at-least-once
    # dead-lettering needs reject-publish overflow.
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.broker.delivery_limit,
        "x-dead-letter-exchange": settings.broker.dead_letter_exchange,
        "x-dead-letter-routing-key": name,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


class Routes:
    """Where a message published to (exchange, routing key) goes, by the declaration's bindings, matched as RabbitMQ
    matches them (topic: `*` one word, `#` zero or more; direct: equal; the default exchange "": the queue named by
    the routing key). ActiveMQ has no exchanges: the STOMP transport routes with this on an ActiveMQ-only site."""

    def __init__(self, settings: Settings) -> None:
        top = declare(settings)
        self._kinds = {e.name: e.type for e in top.exchanges} | {"amq.topic": "topic"}
        self._bindings = top.bindings

    def queues(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [routing_key]
        topic = self._kinds.get(exchange) == "topic"
        found = [b.queue for b in self._bindings if b.exchange == exchange
                 and (topic_matches(b.routing_key, routing_key) if topic else b.routing_key == routing_key)]
        return list(dict.fromkeys(found))


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on dots; `*` is one word, `#` zero or more."""
    want, have = pattern.split("."), routing_key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and want[i] in ("*", have[j]) and match(i + 1, j + 1)

    return match(0, 0)


def stomp_destination(destination: str) -> tuple[str, str]:
    """A RabbitMQ STOMP destination as AMQP (exchange, routing key), the STOMP plugin's own mapping:
    /topic/K → amq.topic K; /exchange/E/K → E K; /queue/Q and /amq/queue/Q → the default exchange, Q."""
    parts = destination.split("/")
    if destination.startswith("/topic/"):
        return "amq.topic", destination.removeprefix("/topic/")
    if destination.startswith("/exchange/") and len(parts) >= 3:
        return parts[2], "/".join(parts[3:])
    for prefix in ("/amq/queue/", "/queue/"):
        if destination.startswith(prefix):
            return "", destination.removeprefix(prefix)
    return "", destination


def vhost_of(url: str) -> str:
    path = urlparse(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def where(url: str) -> str:
    """A broker URL as it may be shown: scheme, host, port and vhost; never the user or the password."""
    u = urlparse(url)
    host = u.hostname or "localhost"
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{host}{port}{u.path or '/'}"


@dataclass(frozen=True)
class Permission:
    """A role's RabbitMQ permissions: regular expressions over resource names (configure, write, read)."""

    configure: str
    write: str
    read: str


ROLES = ("daq", "ingest", "cleanup", "hermes", "ops")
USER_PREFIX = "rucio-injector-"


def permissions(settings: Settings) -> dict[str, Permission]:
    """Least privilege per role, from the declaration (RabbitMQ checks write on an exchange to publish and on a
    queue to bind it, read on a queue to consume, get or purge it, configure to declare or delete; the default
    exchange is `amq.default`; passive declares need none):
    - daq: publish file-closed to the DAQ exchange, consume file-archived from its inbox; nothing else;
    - ingest: consume its queue; publish dead letters (DLX) and retry copies (default exchange);
    - cleanup: consume its queue; publish dead letters, retry copies and file-archived (DAQ exchange);
    - hermes (Rucio's): publish Rucio's events to amq.topic (what /topic/... is on RabbitMQ's STOMP);
    - ops (broker setup, dlq, status, reconcile): declare, bind, read, purge and publish on the project's names.
    cleanup's queue is on this broker only with flavour "rabbitmq" (on ActiveMQ its login is ActiveMQ's)."""
    top = declare(settings)
    b, inbox = settings.broker, archived_queue(settings)
    ours = [e.name for e in top.exchanges] + [q.name for q in top.queues]
    nothing = "^$"
    roles = {
        "daq": Permission(nothing, _names(b.daq_exchange), _names(inbox)),
        "ingest": Permission(nothing, _names(b.dead_letter_exchange, "amq.default"), _names(settings.ingest.queue)),
        "hermes": Permission(nothing, _names("amq.topic"), nothing),
        "ops": Permission(_names(*ours), _names(*ours, "amq.default", "amq.topic"), _names(*ours, "amq.topic")),
    }
    if settings.cleanup.flavour == "rabbitmq":
        roles["cleanup"] = Permission(nothing, _names(b.dead_letter_exchange, b.daq_exchange, "amq.default"),
                                      _names(settings.cleanup.queue))
    return {role: roles[role] for role in ROLES if role in roles}


def _names(*names: str) -> str:
    """A regular expression matching exactly these resource names."""
    return "^(" + "|".join(re.escape(n) for n in dict.fromkeys(names)) + ")$"


def definitions(topology: Topology, settings: Settings | None = None) -> dict[str, Any]:
    """RabbitMQ definitions (import with `rabbitmqctl import_definitions` or the management UI). With the settings,
    one user per role (`permissions`) WITHOUT a password: set each at deploy (`rabbitmqctl change_password`);
    until then no one can log in as them."""
    v = topology.vhost
    roles = permissions(settings) if settings is not None else {}
    return {
        "users": [{"name": USER_PREFIX + role, "password_hash": "", "hashing_algorithm":
                   "rabbit_password_hashing_sha256", "tags": ""}
                  for role in roles],
        "permissions": [{"user": USER_PREFIX + role, "vhost": v, "configure": p.configure, "write": p.write,
                         "read": p.read} for role, p in roles.items()],
        "vhosts": [{"name": v}],
        "exchanges": [
            {"name": e.name, "vhost": v, "type": e.type, "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}}
            for e in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": v, "durable": True, "auto_delete": False, "arguments": q.arguments}
            for q in topology.queues
        ],
        "bindings": [
            {"source": bd.exchange, "vhost": v, "destination": bd.queue, "destination_type": "queue",
             "routing_key": bd.routing_key, "arguments": {}}
            for bd in topology.bindings
        ],
    }


def remove(connection: Any, topology: Topology) -> None:
    """Delete every queue (with its messages) and exchange of a throw-away topology: the demo's,
    a test's, a benchmark's. Never for a site's own: its queues hold undelivered events."""
    channel = connection.channel()
    try:
        for q in topology.queues:
            channel.queue_delete(q.name)
        for e in topology.exchanges:
            if not e.name.startswith("amq."):
                channel.exchange_delete(e.name)
    finally:
        if channel.is_open:
            channel.close()


def apply(connection: Any, topology: Topology) -> list[str]:
    """Declare everything on an open kombu connection; idempotent. Returns what was declared."""
    import amqp

    steps: list[tuple[str, Any]] = []
    for e in topology.exchanges:
        if not e.name.startswith("amq."):  # amq.* exist already and may not be declared
            steps.append((f"exchange {e.name} ({e.type})", ("exchange_declare", (e.name, e.type), {})))
    for q in topology.queues:
        kind = q.arguments.get("x-queue-type", "classic")
        steps.append((f"queue {q.name} ({kind})", ("queue_declare", (q.name,), {"arguments": q.arguments})))
    for bd in topology.bindings:
        steps.append(
            (f"binding {bd.exchange} --{bd.routing_key}--> {bd.queue}",
             ("queue_bind", (bd.queue, bd.exchange, bd.routing_key), {}))
        )
    channel = connection.channel()
    done: list[str] = []
    try:
        for what, (method, args, kwargs) in steps:
            if method != "queue_bind":
                kwargs = {**kwargs, "durable": True, "auto_delete": False}
            try:
                getattr(channel, method)(*args, **kwargs)
            except amqp.exceptions.PreconditionFailed as exc:
                raise TopologyMismatch(_mismatch(what, exc)) from None
            done.append(what)
    finally:
        if channel.is_open:
            channel.close()
    return done


def require(connection: Any, exchanges: Sequence[str], queues: Sequence[str]) -> None:
    """Raise TopologyMissing for the first of these exchanges or queues the broker does not have, on an open
    kombu connection (passive declares: nothing is created)."""
    import amqp

    place = where(connection.as_uri())
    for kind, names in (("exchange", exchanges), ("queue", queues)):
        for name in names:
            channel = connection.channel()
            try:
                if kind == "exchange":
                    channel.exchange_declare(name, "topic", passive=True)
                else:
                    channel.queue_declare(name, passive=True)
            except amqp.exceptions.NotFound:
                raise TopologyMissing(
                    f"{kind} {name!r} does not exist on {place}: run `rucio-injector broker setup`") from None
            if channel.is_open:
                channel.close()


def _mismatch(what: str, exc: Exception) -> str:
    text = f"the broker already has {what} declared differently ({exc})"
    if what.startswith("queue ") and what.split()[1].endswith(DLQ_SUFFIX):
        return (f"{text}: dead-letter queues are classic queues now: run `rucio-injector dlq migrate`, which "
                "recreates it keeping every dead letter (broker-config/README.md), then `broker setup` again")
    return f"{text}: delete it (after draining it) or rename it in the config, then run `broker setup` again"
