"""The one settings object, read once at start-up from a TOML file (+ environment overrides).

`load()` is the only place that reads the environment; everything else receives `Settings`.
"""

from __future__ import annotations

import os
import posixpath
import re
import ssl
import string
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlparse, urlunparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from injector.errors import ConfigError

CONFIG_ENV = "RUCIO_INJECTOR_CONFIG"
BROKER_URL_ENV = "RUCIO_INJECTOR_BROKER_URL"

TEMPLATE_FIELDS = frozenset({"site", "instrument", "night", "run", "datatype", "date", "stream"})
PATH_FIELDS = frozenset({"night", "run", "datatype"})  # named groups a stream's path_fields may have
RSE_NAME = r"^([A-Z0-9]+([_-][A-Z0-9]+)*)$"
RUCIO_BULK = 1000  # items per bulk Rucio call (add_replicas' schema limit): batches and bulk calls stay within it
Scope = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,25}$")]
Word = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Section):
    """One replication rule a stream's datasets carry to the archive."""

    rse_expression: str
    copies: Annotated[int, Field(ge=1)] = 1
    activity: str = "User Subscriptions"
    lifetime: Annotated[int, Field(gt=0)] | None = None
    grouping: Literal["ALL", "DATASET", "NONE"] = "DATASET"


class Stream(_Section):
    """Which events a stream takes, where their files live and where they must be archived."""

    name: Word
    site: Word
    instrument: Word
    datatype: Word | None = None
    source_rse: Annotated[str, StringConstraints(pattern=RSE_NAME)]
    storage_root: str
    pfn_prefix: str = "file://localhost"
    scope: Scope
    did_name: Literal["path", "relative", "basename"] = "path"
    did_prefix: str = ""
    dataset: str
    rules: Annotated[list[Rule], Field(min_length=1)]
    release_source: bool = True
    failure_limit: Annotated[int, Field(ge=1)] = 3
    path_fields: str | None = None  # watch: regex, groups night/run/datatype, searched in the path below the root
    # A closed dataset: dead-letter its files (`dataset-closed`), or roll on to <dataset>.2, <dataset>.3, ...
    on_closed_dataset: Literal["dead-letter", "next"] = "dead-letter"
    # Refuse (dead-letter `bad-signature`) a file-closed event of this stream that no [signing] key signed.
    require_signature: bool = False

    @field_validator("path_fields")
    @classmethod
    def _check_path_fields(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            _check_path_pattern(pattern)
        return pattern

    @model_validator(mode="after")
    def _check(self) -> Stream:
        root = self.storage_root
        if not root.startswith("/") or posixpath.normpath(root) != root.rstrip("/") or "/../" in root:
            raise ValueError(f"storage_root must be an absolute normalised path (got {root!r})")
        if not re.match(r"^[a-z][a-z0-9+.-]*://", self.pfn_prefix):
            raise ValueError(f"pfn_prefix must start with a URL scheme like file:// (got {self.pfn_prefix!r})")
        _check_template(self.dataset)
        return self


def _check_path_pattern(pattern: str) -> None:
    try:
        groups = set(re.compile(pattern).groupindex)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    if not groups or groups - PATH_FIELDS:
        found = f"unknown group(s) {sorted(groups - PATH_FIELDS)}" if groups else "no named group"
        raise ValueError(f"{pattern!r} has {found}; allowed: (?P<name>...) with name in {sorted(PATH_FIELDS)}")


def template_fields(template: str) -> frozenset[str]:
    """The fields a dataset template names ({night} ...)."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name is not None)


def _check_template(template: str) -> None:
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise ValueError(f"dataset template {template!r} is not a valid format string: {exc}") from None
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"dataset template {template!r} uses unknown field(s) {sorted(unknown)}; "
            f"allowed: {sorted(TEMPLATE_FIELDS)}"
        )


class Tls(_Section):
    """TLS for one broker connection: [broker.tls] (the DAQ broker) or [cleanup.tls] (hermes' STOMP broker). The
    section's presence turns TLS on; amqps:// and stomp+ssl:// urls turn it on too, with these defaults."""

    ca_file: str | None = None  # PEM CA certificate(s) the server's certificate must chain to; unset: the system's
    cert_file: str | None = None  # our client certificate (PEM), for brokers that ask for one (verify_peer)
    key_file: str | None = None  # its private key (PEM, not encrypted); unset: it is in cert_file
    verify: bool = True  # false: the server's certificate is not checked at all (a test bench only; logged)
    # The name the server's certificate must carry (and SNI) when it is not the host in the url (an IP, an alias).
    server_name: str | None = None
    # Log in as the client certificate (RabbitMQ's EXTERNAL mechanism, plugin rabbitmq_auth_mechanism_ssl: the user
    # is the certificate's subject or CN, as ssl_cert_login_from says) instead of the url's user and password.
    certificate_login: bool = False

    @model_validator(mode="after")
    def _check(self) -> Tls:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file without cert_file: give the client certificate the key belongs to")
        if self.certificate_login and not self.cert_file:
            raise ValueError("certificate_login needs cert_file (and key_file): the certificate is the login")
        if not self.verify and (self.ca_file or self.server_name):
            raise ValueError("verify = false checks no certificate, so ca_file and server_name would be ignored: "
                             "drop them, or keep verify on")
        self.context()
        return self

    def context(self) -> ssl.SSLContext:
        """A client context as the transports build theirs from these settings; reading each file here says which
        one is missing or not PEM (ValueError), at start-up rather than at the first connection."""
        ctx = ssl.create_default_context()
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ca, cert, key = self.file("ca_file"), self.file("cert_file"), self.file("key_file")
        for name, path in (("ca_file", ca), ("cert_file", cert), ("key_file", key)):
            if path is not None and not os.access(path, os.R_OK):
                why = "does not exist" if not os.path.exists(path) else "is not readable"
                raise ValueError(f"{name} {getattr(self, name)} {why}")
        try:
            if ca:
                ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ca_file {self.ca_file} holds no PEM certificate ({exc})") from None
        try:
            if cert:
                ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cert_file {self.cert_file} / key_file {self.key_file or '(in cert_file)'}: not a "
                             f"PEM certificate with its unencrypted private key ({exc})") from None
        return ctx

    def check_stomp(self) -> None:
        """ValueError for what these settings ask and STOMP (stomp.py, ActiveMQ) cannot do."""
        if self.server_name:  # stomp.py checks the certificate against the host it connects to, and no other name
            raise ValueError("server_name is not available over STOMP (stomp.py checks the certificate against the "
                             "host it connects to): write the host as the server's certificate names it (add it to "
                             "/etc/hosts if DNS does not know that name)")
        if self.certificate_login:
            raise ValueError("certificate_login is for AMQP (RabbitMQ's EXTERNAL mechanism); over STOMP the broker "
                             "decides from the certificate itself (ActiveMQ's certificate login module)")

    def file(self, key: Literal["ca_file", "cert_file", "key_file"]) -> str | None:
        """The path of one file, `~` expanded, as the transports open it."""
        path: str | None = getattr(self, key)
        return os.path.expanduser(path) if path else None


TLS_SCHEMES = ("amqps", "stomp+ssl")  # url schemes that turn TLS on without a [broker.tls] section


@dataclass(frozen=True)
class StompServer:
    """A STOMP broker (ActiveMQ) as a client connects to it: hermes' broker ([cleanup]) or the DAQ broker itself
    when its [broker] urls are stomp:// (an ActiveMQ-only site)."""

    addresses: tuple[tuple[str, int], ...]
    username: str
    password: str = field(repr=False)
    vhost: str = "/"
    heartbeat_ms: int = 10000
    tls: Tls | None = None  # TLS on every address

    @property
    def hosts(self) -> str:
        """HOST:PORT, ... for messages (never the user or the password)."""
        return ", ".join(f"{h}:{p}" for h, p in self.addresses)


STOMP_SCHEMES = ("stomp", "stomp+ssl")


class Broker(_Section):
    """The DAQ broker: AMQP URLs (RabbitMQ), or stomp://USER:PASS@HOST:PORT URLs (ActiveMQ-only sites). `password`,
    when set (from `password_file` or RUCIO_INJECTOR_BROKER_PASSWORD[_FILE], see `load`), is the password of every
    URL: the URLs then name only the user (amqp://ingest@rabbit1:5672//)."""

    urls: Annotated[list[str], Field(min_length=1)] = ["amqp://guest:guest@127.0.0.1:5672//"]
    password: SecretStr | None = None
    tls: Tls | None = None  # [broker.tls]: TLS to every url (amqps:// and stomp+ssl:// urls imply it)
    daq_exchange: str = "rucio-injector.daq"
    dead_letter_exchange: str = "rucio-injector.dlx"
    # The DAQ's inbox of file-archived events (bound to file.archived.#); unset: the ingest queue's name with its
    # last dotted word replaced by "archived" (rucio-injector.ingest → rucio-injector.archived).
    archived_queue: str | None = None
    heartbeat: Annotated[int, Field(ge=0)] = 30
    delivery_limit: Annotated[int, Field(ge=1)] = 5
    connect_attempts: Annotated[int, Field(ge=1)] = 10
    # While Rucio is down a consumer holds its messages unacked; past this many seconds it hands them back to
    # the queue (without spending their delivery budget) and disconnects until Rucio answers. Keep it below
    # RabbitMQ's consumer_timeout (30 min by default), which would otherwise return them counted.
    outage_hold: Annotated[float, Field(gt=0)] = 900.0

    @field_validator("urls")
    @classmethod
    def _one_transport(cls, urls: list[str]) -> list[str]:
        kinds = {_transport_of(u) for u in urls}
        if len(kinds) > 1:
            raise ValueError("all urls must use one protocol: amqp:// (RabbitMQ) or stomp:// (ActiveMQ), not both")
        for u in urls:
            if _transport_of(u) == "stomp":
                parsed = urlparse(u)
                if not parsed.hostname or not parsed.port:
                    raise ValueError("stomp urls are stomp://USER:PASSWORD@HOST:PORT or stomp+ssl://… (the port is "
                                     "required)")
        return urls

    @model_validator(mode="after")
    def _tls_for_all(self) -> Broker:
        schemes = {urlparse(u).scheme in TLS_SCHEMES for u in self.urls}
        if len(schemes) > 1 and self.tls is None:
            raise ValueError("some urls use TLS (amqps://, stomp+ssl://) and some do not: TLS is for every url of "
                             "the broker; add [broker.tls] or use one kind of url")
        if self.tls is not None and self.transport == "stomp":
            self.tls.check_stomp()
        return self

    @property
    def tls_settings(self) -> Tls | None:
        """TLS for every url, or None: [broker.tls], else the defaults when the urls are amqps:// or stomp+ssl://."""
        if self.tls is not None:
            return self.tls
        return Tls() if urlparse(self.urls[0]).scheme in TLS_SCHEMES else None

    @property
    def transport(self) -> Literal["amqp", "stomp"]:
        """The transport plug-in (injector.transport) this broker is spoken to with."""
        return _transport_of(self.urls[0])

    @property
    def connect_urls(self) -> list[str]:
        """The URLs a client connects with: `password` put into each (only a connection ever holds these)."""
        if self.password is None:
            return list(self.urls)
        secret = quote(self.password.get_secret_value(), safe="")
        out = []
        for u in self.urls:
            parsed = urlparse(u)
            user = parsed.netloc.rpartition("@")[0].partition(":")[0] if "@" in parsed.netloc else "guest"
            host = parsed.netloc.rpartition("@")[2]
            out.append(urlunparse(parsed._replace(netloc=f"{user}:{secret}@{host}")))
        return out

    @property
    def stomp(self) -> StompServer:
        """The broker as a STOMP server (stomp:// urls, in failover order)."""
        parsed = [urlparse(u) for u in self.connect_urls]
        first = parsed[0]
        return StompServer(tuple((u.hostname or "", u.port or 0) for u in parsed),
                           unquote(first.username or ""), unquote(first.password or ""),
                           unquote(first.path[1:]) if len(first.path) > 1 else "/", self.heartbeat * 1000,
                           self.tls_settings)


def _transport_of(url: str) -> Literal["amqp", "stomp"]:
    return "stomp" if urlparse(url).scheme in STOMP_SCHEMES else "amqp"


class Ingest(_Section):
    queue: str = "rucio-injector.ingest"
    binding: str = "file.closed.#"
    batch_size: Annotated[int, Field(ge=1, le=RUCIO_BULK)] = RUCIO_BULK
    batch_window: Annotated[float, Field(gt=0, le=60)] = 0.2
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 2000


class Cleanup(_Section):
    """Where hermes publishes Rucio's events and how cleanup consumers share them (STOMP)."""

    flavour: Literal["rabbitmq", "activemq"] = "rabbitmq"
    stomp_hosts: Annotated[list[str], Field(min_length=1)] = ["127.0.0.1:61613"]
    username: str = "guest"
    # No password in the code: from password_file / RUCIO_INJECTOR_CLEANUP_PASSWORD[_FILE] (`load`), or none (an
    # empty passcode: an ActiveMQ without an authentication plugin takes any login).
    password: SecretStr | None = None
    vhost: str = "/"
    hermes_destination: str = "/topic/rucio.events"  # [messaging-hermes] destination
    queue: str = "rucio-injector.cleanup"  # RabbitMQ: durable queue bound to amq.topic
    app: str = "rucio-injector"  # ActiveMQ: consumers share /queue/Consumer.<app>.<virtual topic>
    batch_size: Annotated[int, Field(ge=1, le=RUCIO_BULK)] = 500
    batch_window: Annotated[float, Field(gt=0, le=60)] = 0.5
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 1000
    heartbeat_ms: Annotated[int, Field(ge=0)] = 10000
    tls: Tls | None = None  # [cleanup.tls]: STOMP over TLS to every stomp_hosts entry (RabbitMQ 61614, stomp+ssl)

    @model_validator(mode="after")
    def _check(self) -> Cleanup:
        if not self.hermes_destination.startswith("/topic/"):
            raise ValueError(f"hermes_destination must be a /topic/ destination (got {self.hermes_destination!r})")
        if self.flavour == "activemq" and not self.topic.startswith("VirtualTopic."):
            raise ValueError("with ActiveMQ, hermes_destination must be a virtual topic: /topic/VirtualTopic.<name>")
        for hp in self.stomp_hosts:
            _host_port(hp)
        if self.tls is not None:
            self.tls.check_stomp()
        return self

    @property
    def stomp_addresses(self) -> list[tuple[str, int]]:
        """`stomp_hosts` as (host, port) pairs, in their order."""
        return [_host_port(hp) for hp in self.stomp_hosts]

    @property
    def server(self) -> StompServer:
        """hermes' broker, where cleanup consumers subscribe over STOMP (ActiveMQ)."""
        return StompServer(tuple(self.stomp_addresses), self.username,
                           self.password.get_secret_value() if self.password else "", self.vhost, self.heartbeat_ms,
                           self.tls)

    @property
    def topic(self) -> str:
        """The topic name hermes publishes to (RabbitMQ: the amq.topic routing key)."""
        return self.hermes_destination.removeprefix("/topic/")

    @property
    def subscription(self) -> str:
        """The STOMP destination competing cleanup consumers subscribe to."""
        if self.flavour == "rabbitmq":
            return f"/amq/queue/{self.queue}"
        return f"/queue/Consumer.{self.app}.{self.topic}"

    @property
    def consumer_queue(self) -> str:
        """The broker queue the cleanup consumers share (dead letters name it as their source)."""
        return self.queue if self.flavour == "rabbitmq" else self.subscription.removeprefix("/queue/")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"stomp_hosts entries are HOST:PORT (got {text!r})")
    return host, int(port)


class MetricsSettings(_Section):
    """Where each long-running verb serves /metrics and /healthz (0 = off)."""

    host: str = "0.0.0.0"
    ingest_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    cleanup_port: Annotated[int, Field(ge=0, le=65535)] = 9465
    reconcile_port: Annotated[int, Field(ge=0, le=65535)] = 9466


class OutboxSettings(_Section):
    """The DAQ side's durable outbox (`producers.outbox`): every file-closed event is written here before it is
    published and deleted only after the broker's confirm. One SQLite file (WAL) on a LOCAL disk of the DAQ host,
    shared by the `watch`, `publish` and DaqPublisher processes of one broker; `~` is the user's home. Unset: the
    XDG state directory, `$XDG_STATE_HOME/rucio-injector/outbox.sqlite` (`~/.local/state/…` when it is unset)."""

    path: str | None = None
    max_events: Annotated[int, Field(ge=1)] = 100_000  # events waiting for the broker; past it a publish is refused

    @property
    def file(self) -> str:
        if self.path:
            return os.path.expanduser(self.path)
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return os.path.join(state, "rucio-injector", "outbox.sqlite")


class SigningKey(_Section):
    """One key that signs file-closed events (HMAC-SHA256, `injector.signing`): which sites' events it may sign and
    where its secret is — a file, or an environment variable — never the secret itself."""

    sites: Annotated[list[Word], Field(min_length=1)]
    file: str | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SigningKey:
        if (self.file is None) == (self.env is None):
            raise ValueError("give the key's secret as exactly one of file (a path) or env (a variable's name)")
        return self


class Signing(_Section):
    """Keys by id (the `injector-key-id` header names one); two ids for one site are both accepted (rotation).
    `sign_with`: the key `publish`, `watch` and DaqPublisher sign with (unset: they do not sign)."""

    keys: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")], SigningKey] = {}
    sign_with: str | None = None

    @model_validator(mode="after")
    def _known(self) -> Signing:
        if self.sign_with is not None and self.sign_with not in self.keys:
            raise ValueError(f"sign_with names key {self.sign_with!r}, which [signing.keys] does not have")
        return self


class RucioSettings(_Section):
    """How we call Rucio; who we are comes from the rucio-clients config (RUCIO_CONFIG)."""

    retry_attempts: Annotated[int, Field(ge=1)] = 5  # a call that lost a concurrent-insert race
    retry_max_wait: Annotated[float, Field(gt=0)] = 10.0
    timeout: Annotated[float, Field(gt=0)] = 120.0  # seconds one HTTP request may take (rucio-clients: 600)
    probe_first: Annotated[float, Field(gt=0)] = 1.0  # outage: first pause between health probes (jittered)
    probe_cap: Annotated[float, Field(gt=0)] = 60.0  # outage: longest pause between health probes


class Settings(_Section):
    broker: Broker = Broker()
    ingest: Ingest = Ingest()
    rucio: RucioSettings = RucioSettings()
    metrics: MetricsSettings = MetricsSettings()
    cleanup: Cleanup = Cleanup()
    outbox: OutboxSettings = OutboxSettings()
    signing: Signing = Signing()
    streams: list[Stream] = []

    @model_validator(mode="after")
    def _one_broker_kind(self) -> Settings:
        if self.broker.transport == "stomp" and self.cleanup.flavour != "activemq":
            raise ValueError('[broker] urls are stomp:// (ActiveMQ): set [cleanup] flavour = "activemq" too (a '
                             "RabbitMQ cleanup queue is read over AMQP, which this site has no broker for)")
        return self

    @model_validator(mode="after")
    def _unique_streams(self) -> Settings:
        seen: dict[tuple[str, str, str | None], str] = {}
        names: set[str] = set()
        for s in self.streams:
            if s.name in names:
                raise ValueError(f"two streams are named {s.name!r}")
            names.add(s.name)
            key = (s.site, s.instrument, s.datatype)
            if key in seen:
                raise ValueError(f"streams {seen[key]!r} and {s.name!r} both match {key}")
            seen[key] = s.name
        for i, a in enumerate(self.streams):
            for b in self.streams[i + 1:]:
                _check_roots(a, b)
        return self

    @model_validator(mode="after")
    def _signed_streams_have_keys(self) -> Settings:
        for s in self.streams:
            if s.require_signature and not any(s.site in k.sites for k in self.signing.keys.values()):
                raise ValueError(f"stream {s.name!r} requires signatures, but no [signing.keys] key signs site "
                                 f"{s.site!r}: every event of it would be refused")
        return self

    def stream_named(self, name: str) -> Stream:
        for s in self.streams:
            if s.name == name:
                return s
        raise ConfigError(f"no stream named {name!r} (known: {[s.name for s in self.streams]})")

    def selected_streams(self, names: Sequence[str]) -> list[Stream]:
        """The streams named (all when none); an unknown name is an error, not an empty sweep."""
        unknown = set(names) - {s.name for s in self.streams}
        if unknown:
            raise ConfigError(f"no stream named {', '.join(sorted(unknown))} in the configuration")
        return [s for s in self.streams if not names or s.name in names]


def _check_roots(a: Stream, b: Stream) -> None:
    """Two streams must not own one file (it would become two DIDs), except the datatype split of one stream:
    the same root and DID rule, so the file's DID is the same whichever of them takes it. Streams of different
    sites with different source RSEs never share a disk, whatever their roots are called."""
    same = ("site", "instrument", "scope", "source_rse", "storage_root", "did_name", "did_prefix")
    if all(getattr(a, f) == getattr(b, f) for f in same) and a.datatype != b.datatype:
        return
    if a.site != b.site and a.source_rse != b.source_rse:
        return  # two sites' buffers: the same spelling names different disks
    ra, rb = a.storage_root.rstrip("/") or "/", b.storage_root.rstrip("/") or "/"
    why = _overlap(ra, rb)
    if why is None and os.path.exists(ra) and os.path.exists(rb):
        real_a, real_b = os.path.realpath(ra), os.path.realpath(rb)
        found = _overlap(real_a, real_b)
        why = None if found is None else f"{found} once symlinks are resolved ({ra} is {real_a}, {rb} is {real_b})"
    if why is not None:
        raise ValueError(
            f"streams {a.name!r} and {b.name!r} have overlapping storage roots: {why}; a file below both would be "
            "registered twice (two DIDs). Give each stream its own directory (only streams that split one "
            "site+instrument by datatype may share a root, with the same scope, source_rse, did_name, did_prefix)")


def _overlap(a: str, b: str) -> str | None:
    if a == b:
        return f"both are {a}"
    for outer, inner in ((a, b), (b, a)):
        if os.path.commonpath([outer, inner]) == outer:
            return f"{inner} lies inside {outer}"
    return None


PASSWORDS = ("broker", "cleanup")  # sections whose password may come from a file or the environment


def load(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read the TOML config (path, else $RUCIO_INJECTOR_CONFIG) and apply environment overrides: any field as
    RUCIO_INJECTOR__SECTION__KEY (`_overrides`), the broker URLs as RUCIO_INJECTOR_BROKER_URL. Passwords: for
    [broker] and [cleanup], RUCIO_INJECTOR_<SECTION>_PASSWORD, else the file named by
    RUCIO_INJECTOR_<SECTION>_PASSWORD_FILE, else the section's `password_file` (its text, without the final newline)
    is the section's password. Every password is kept secret from then on (`injector.logs.masked`)."""
    env = dict(os.environ) if env is None else env
    where = path or env.get(CONFIG_ENV)
    if not where:
        raise ConfigError(f"no config file: pass --config FILE or set {CONFIG_ENV}")
    try:
        with open(where, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {where} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {where} is not valid TOML: {exc}") from None
    _overrides(data, env)
    if env.get(BROKER_URL_ENV):
        data.setdefault("broker", {})["urls"] = env[BROKER_URL_ENV].split(",")
    for section in PASSWORDS:
        _password(data, section, env)
    settings = parse(data, source=str(where))
    _keep_secrets(settings)
    return settings


OVERRIDE_PREFIX = "RUCIO_INJECTOR__"


def _overrides(data: dict[str, Any], env: dict[str, str]) -> None:
    """Any field from the environment: RUCIO_INJECTOR__<SECTION>__<KEY>=<value> (double underscores; a stream by
    its index, RUCIO_INJECTOR__STREAMS__0__DATASET; names in any case). The value is read as a TOML value
    (`500`, `true`, `["a", "b"]`, `"text"`), else taken as text; it wins over the file."""
    for name in sorted(k for k in env if k.upper().startswith(OVERRIDE_PREFIX)):
        path = [part.lower() for part in name[len(OVERRIDE_PREFIX):].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty name part (use RUCIO_INJECTOR__SECTION__KEY)")
        try:
            value: Any = tomllib.loads(f"v = {env[name]}")["v"]
        except tomllib.TOMLDecodeError:
            value = env[name]
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"environment variable {name}: the file has no {'.'.join(path[:i])}[{part}]")
                node = node[int(part)]
            elif isinstance(node, dict):
                if path[i + 1].isdigit() and not isinstance(node.get(part), list):
                    raise ConfigError(f"environment variable {name}: the file has no {'.'.join(path[:i + 1])}"
                                      f"[{path[i + 1]}]")
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"environment variable {name}: {'.'.join(path[:i])} is not a section")
        if not isinstance(node, dict):
            raise ConfigError(f"environment variable {name}: {'.'.join(path[:-1])} is not a section")
        node[path[-1]] = value


def _password(data: dict[str, Any], section: str, env: dict[str, str]) -> None:
    """The section's password from the environment or a file, in place of `password_file` (see `load`)."""
    table = data.get(section)
    if table is not None and not isinstance(table, dict):
        return  # parse() says what is wrong with it
    table = data.setdefault(section, {})
    name = f"RUCIO_INJECTOR_{section.upper()}_PASSWORD"
    file = table.pop("password_file", None)
    if env.get(name):
        table["password"] = env[name]
        return
    file = env.get(name + "_FILE") or file
    if file is not None:
        table["password"] = secret_file(str(file), f"[{section}] password: cannot read the password file")


def secret_file(path: str, refusal: str) -> str:
    """A secret kept in a file (a password, a signing key): its text without the final newline; `~` is the user's
    home. Unreadable: ConfigError "<refusal> <path>: <why>", which never holds any of the file's text."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            return fh.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{refusal} {path}: {why}") from None


def _keep_secrets(settings: Settings) -> None:
    """Every password the settings hold, hidden from every log line and message from now on."""
    from injector.logs import keep_secret

    for url in settings.broker.connect_urls:
        keep_secret(unquote(urlparse(url).password or ""))
    if settings.cleanup.password is not None:
        keep_secret(settings.cleanup.password.get_secret_value())


def parse(data: dict[str, object], source: str = "<config>") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {_where(err['loc'], data)}: {err['msg']}" for err in exc.errors(include_url=False)]
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None


def _where(loc: tuple[int | str, ...], data: dict[str, object]) -> str:
    """`streams[1] (lst1-raw).dataset` rather than `streams.1.dataset`."""
    parts: list[str] = []
    node: object = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node):
                node = node[item]
                if isinstance(node, dict) and "name" in node:
                    label += f" ({node['name']})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + item)
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "config"
