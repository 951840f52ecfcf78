"""Session fixtures for the real Rucio server (PyPI rucio 41.5.1 on the local PostgreSQL).

Nothing here skips: if the server cannot start, every test that needs it errors with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.testbed.rses import create_rses
from injector.testbed.rucio import RucioServer, ensure_server_venv, start_server

SOURCE, ARCHIVE = "ORM-BUFFER", "PIC-ARCHIVE"


@pytest.fixture(scope="session")
def rucio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RucioServer]:
    base = tmp_path_factory.mktemp("rucio")
    with start_server(base, venv_python=ensure_server_venv()) as server:
        os.environ["RUCIO_CONFIG"] = str(server.client_config)  # before rucio-clients reads its config
        yield server


@pytest.fixture(scope="session")
def rucio_client(rucio_server: RucioServer) -> Any:
    from rucio.client import Client

    client = Client()
    src, dst = create_rses(client, rucio_server.base_dir / "data", source=SOURCE, archive=ARCHIVE)
    for scope in ("lst", "magic"):
        client.add_scope("root", scope)
    client.source_dir, client.archive_dir = src, dst
    return client


class Lab:
    """A per-test corner of the shared Rucio: its own buffer directory and dataset names."""

    def __init__(self, client: Any, server: RucioServer) -> None:
        self.client = client
        self.server = server
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


@pytest.fixture
def lab(rucio_client: Any, rucio_server: RucioServer) -> Lab:
    return Lab(rucio_client, rucio_server)


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
