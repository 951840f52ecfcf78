"""The test bed itself: the integration suite's Rucio runs on PostgreSQL, never silently on SQLite."""

from __future__ import annotations

import pytest

from injector.testbed.rucio import RucioServer
from tests.integration import conftest

pytestmark = pytest.mark.integration


def test_the_integration_rucio_server_runs_on_postgresql(rucio_server: RucioServer) -> None:
    assert rucio_server.database.startswith("rucio_testbed_"), rucio_server.database
    assert "postgresql" in rucio_server.server_config.read_text()


def test_without_postgresql_the_fixtures_refuse_instead_of_falling_back_to_sqlite(monkeypatch) -> None:
    monkeypatch.setattr(conftest, "postgres_available", lambda: False)
    with pytest.raises(RuntimeError, match="PostgreSQL"):
        conftest.on_postgresql()
