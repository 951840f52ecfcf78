"""Session fixtures for the real Rucio server (PyPI rucio, the testbed's RUCIO_VERSION, on the local PostgreSQL).

Nothing here skips: if the server cannot start, every test that needs it errors with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.testbed.rses import create_rses
from injector.testbed.rucio import RucioServer, ensure_server_venv, postgres_available, start_server

SOURCE, ARCHIVE = "ORM-BUFFER", "PIC-ARCHIVE"


def on_postgresql() -> str:
    """The integration tests' Rucio database: PostgreSQL, as in production. No fallback to SQLite (the demo's):
    without PostgreSQL every test needing Rucio errors with this reason."""
    if not postgres_available():
        raise RuntimeError("the integration tests run Rucio on PostgreSQL and none answers on 127.0.0.1:5432; "
                           "start it (SQLite is for the demo only)")
    return "postgresql"


@pytest.fixture(scope="session")
def rucio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RucioServer]:
    base = tmp_path_factory.mktemp("rucio")
    with start_server(base, venv_python=ensure_server_venv(), database=on_postgresql()) as server:
        os.environ["RUCIO_CONFIG"] = str(server.client_config)  # before rucio-clients reads its config
        yield server


@pytest.fixture(scope="session")
def rucio_client(rucio_server: RucioServer) -> Any:
    from rucio.client import Client

    return _equipped(Client(), rucio_server)


def _equipped(client: Any, server: RucioServer) -> Any:
    """The testbed's RSEs and scopes on a fresh server; the client keeps where their files live."""
    src, dst = create_rses(client, server.base_dir / "data", source=SOURCE, archive=ARCHIVE)
    for scope in ("lst", "magic"):
        client.add_scope("root", scope)
    client.source_dir, client.archive_dir = src, dst
    return client


@pytest.fixture(scope="module")
def own_rucio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A Rucio server of one heavy test module (thousands of files with rules, an outage): the session's server,
    whose daemons every test runs, stays small and up. Tests take a corner of it with `own_lab`; in-process code
    reaches it with `lab.gateway(settings)`, a CLI subprocess with RUCIO_CONFIG=lab.server.client_config."""
    from injector.testbed.rucio import PASSWORD, USERNAME

    base = tmp_path_factory.mktemp("own-rucio")
    with start_server(base, venv_python=ensure_server_venv(), database=on_postgresql()) as server:
        from rucio.client import Client

        own = {"rucio_host": server.url, "auth_host": server.url, "account": "root", "auth_type": "userpass",
               "creds": {"username": USERNAME, "password": PASSWORD}}
        client = Client(**own)
        yield Lab(_equipped(client, server), server, own)


class Lab:
    """A per-test corner of the shared Rucio: its own buffer directory and dataset names."""

    def __init__(self, client: Any, server: RucioServer, own: dict[str, Any] | None = None) -> None:
        self.client = client
        self.server = server
        self._own = own  # Client(...) arguments when this is not the session's server (RUCIO_CONFIG)
        self.tag = uuid.uuid4().hex[:8]
        self.root: Path = client.source_dir / self.tag
        self.root.mkdir()

    def stream(self, **over: Any) -> dict[str, Any]:
        s = {"name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": SOURCE,
             "storage_root": str(self.root), "pfn_prefix": "file://localhost", "scope": "lst", "did_name": "path",
             "dataset": f"LST1_{self.tag}_{{night}}_raw",
             "rules": [{"rse_expression": ARCHIVE, "copies": 1, "activity": "User Subscriptions"}]}
        s.update(over)
        return s

    def write(self, relative: str, data: bytes) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def json_meta(self, names: list[str], scope: str = "lst") -> dict[str, dict[str, Any]]:
        """The JSON metadata of each DID that exists, read DID by DID (a Rucio server before 41 ignores `plugin` in
        bulk reads, rucio/rucio#7323: this reads the same on every server the tests run)."""
        from rucio.common.exception import DataIdentifierNotFound

        out = {}
        for n in names:
            try:
                out[n] = {"scope": scope, "name": n, **self.client.get_metadata(scope, n, plugin="JSON")}
            except DataIdentifierNotFound:
                continue
        return out

    def replicas(self, names: list[str], scope: str = "lst") -> dict[str, dict[str, Any]]:
        dids = [{"scope": scope, "name": n} for n in names]
        return {r["name"]: r for r in self.client.list_replicas(dids, all_states=True)}

    def content(self, dataset: str, scope: str = "lst") -> list[str]:
        """Names attached to a dataset ([] while it does not exist)."""
        from rucio.common.exception import DataIdentifierNotFound

        try:
            return sorted(d["name"] for d in self.client.list_content(scope, dataset))
        except DataIdentifierNotFound:
            return []

    def rules(self, dataset: str, scope: str = "lst") -> list[dict[str, Any]]:
        return list(self.client.list_did_rules(scope, dataset))

    def tombstones(self, names: list[str], rse: str, scope: str = "lst") -> dict[str, str | None]:
        """Each replica's tombstone at `rse` (None: none), read from the Rucio server's own database."""
        return {n: tombstone for n, (tombstone, _) in self.replica_rows(names, rse, scope).items()}

    def replica_rows(self, names: list[str], rse: str, scope: str = "lst") -> dict[str, tuple[str | None, str]]:
        """(tombstone, updated_at) of each replica at `rse`, from the Rucio server's own database: Rucio's API never
        shows tombstones, and a test must not take the project's word (its marks) for what it did to Rucio."""
        sql = ("select r.name, coalesce(r.tombstone::text, ''), r.updated_at::text from replicas r "
               "join rses s on r.rse_id = s.id where s.rse = :'rse' and r.scope = :'scope' "
               "and r.name in (select json_array_elements_text(:'names'))")
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", self.server.database, "-AtF", "\t", "-v",
             f"rse={rse}", "-v", f"scope={scope}", "-v", f"names={json.dumps(names)}"],
            input=sql, capture_output=True, text=True, check=True).stdout
        rows = {name: (tombstone or None, updated) for name, tombstone, updated in
                (line.split("\t") for line in out.splitlines() if line)}
        return {n: rows[n] for n in names if n in rows}

    def gateway(self, settings: Any) -> Any:
        """A ClientGateway to this lab's server (the session's through RUCIO_CONFIG, an own one explicitly)."""
        from injector.gateway import ClientGateway

        if self._own is None:
            return ClientGateway(settings.rucio)
        from rucio.client import Client

        own = self._own
        return ClientGateway(settings.rucio, factory=lambda: Client(**own, timeout=settings.rucio.timeout))

    def discard_rucio_events(self) -> None:
        """Send whatever events earlier tests left in the shared Rucio's outbox to a topic nobody reads: hermes sends
        everything pending to the destination of whoever runs it next, and a test must see only its own."""
        from injector.testbed.rucio import HermesBroker

        self.server.run_daemons("hermes", hermes=HermesBroker(destination=f"/topic/discard-{self.tag}"))


@pytest.fixture
def lab(rucio_client: Any, rucio_server: RucioServer) -> Lab:
    return Lab(rucio_client, rucio_server)


@pytest.fixture
def own_lab(own_rucio: Lab) -> Lab:
    """A per-test corner of the module's own Rucio server."""
    return Lab(own_rucio.client, own_rucio.server, own_rucio._own)


@pytest.fixture(scope="session")
def activemq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A throw-away ActiveMQ Classic running broker-config/activemq/activemq.xml."""
    from injector.testbed.activemq import start_activemq

    with start_activemq(tmp_path_factory.mktemp("activemq")) as broker:
        yield broker


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[Any]:
    """The demo's embedded broker (AMQP 0-9-1 + STOMP in one Python process), on free ports."""
    from injector.testbed.broker import embedded

    with embedded() as broker:
        yield broker
