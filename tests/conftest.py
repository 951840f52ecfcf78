"""Shared fixtures: a typical two-stream settings object."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

# Every DaqPublisher, watch and publish of the test run (and the CLI processes it starts) keeps its default outbox in
# a state directory of its own, never in the user's: rows a test leaves unsendable (an unroutable exchange) die with it.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="rucio-injector-tests-state-")

from injector.config import Settings, parse

STREAMS = {
    "streams": [
        {
            "name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": "ORM-BUFFER",
            "storage_root": "/data/lst1", "pfn_prefix": "file://localhost", "scope": "lst",
            "did_name": "path", "dataset": "LST1_{night}_raw",
            "rules": [{"rse_expression": "PIC-ARCHIVE", "copies": 1, "activity": "T0 Export"}],
        },
        {
            "name": "magic-raw", "site": "ORM", "instrument": "MAGIC", "source_rse": "ORM-BUFFER",
            "storage_root": "/data/magic", "scope": "magic", "did_name": "relative",
            "dataset": "MAGIC_{date}_{datatype}",
            "rules": [{"rse_expression": "PIC-ARCHIVE"}],
        },
    ]
}


@pytest.fixture
def settings() -> Settings:
    return parse(STREAMS)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """For a test that runs `injector.logs.setup` (directly or through `main`): the root logger's handlers and level
    put back afterwards, so later tests do not log into this test's closed capture stream."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
