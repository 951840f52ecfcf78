"""Signed file-closed events through the real brokers: `rucio-injector publish` signs with the configured key, ingest
takes what a site's key signed and dead-letters `bad-signature` (body untouched, counted) every forged, altered,
unsigned or other-site event, on RabbitMQ and on an ActiveMQ-only site alike."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from consumers.services import ingest_worker
from injector.config import Settings
from injector.events import FileClosed, encode
from injector.messages import Outgoing
from injector.signing import KEY_ID, SIGNATURE
from injector.testing import FakeRucio
from injector.topology import Routes
from injector.transport import plugin
from tests.integration.cli import run
from tests.integration.rabbit import (
    activemq_site,
    config_toml,
    dead_letters,
    declared,
    running,
    unique_settings,
    wait_for,
)

pytestmark = pytest.mark.integration

SECRET = "5f1e" * 16  # what `openssl rand -hex 32` prints
OTHER_SITE_SECRET = "9a0b" * 16


def signed_settings(root: Path, key_file: Path, broker: str, port: int | None) -> Settings:
    stream = {"name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": "ORM-BUFFER",
              "storage_root": str(root), "scope": "lst", "dataset": "LST1_{night}_raw", "require_signature": True,
              "rules": [{"rse_expression": "PIC-ARCHIVE"}]}
    signing = {"sign_with": "orm-2026", "keys": {"orm-2026": {"sites": ["ORM"], "file": str(key_file)},
                                                  "lpa-2026": {"sites": ["LPA"], "env": "TEST_LPA_KEY"}}}
    site = activemq_site(port) if broker == "activemq" and port else {}
    return unique_settings({"streams": [stream]}, signing=signing, ingest={"batch_window": 0.05}, **site)


def toml_of(s: Settings, root: Path, key_file: Path, outbox: Path) -> str:
    return config_toml(s) + f'''[ingest]
queue = "{s.ingest.queue}"
binding = "{s.ingest.binding}"
[outbox]
path = "{outbox}"
[signing]
sign_with = "orm-2026"
[signing.keys.orm-2026]
sites = ["ORM"]
file = "{key_file}"
[[streams]]
name = "lst1-raw"
site = "ORM"
instrument = "LST1"
source_rse = "ORM-BUFFER"
storage_root = "{root}"
scope = "lst"
dataset = "LST1_{{night}}_raw"
require_signature = true
rules = [{{ rse_expression = "PIC-ARCHIVE" }}]
'''


@pytest.fixture(params=["rabbitmq", "activemq"])
def broker(request: pytest.FixtureRequest) -> tuple[str, int | None]:
    if request.param == "activemq":
        return "activemq", request.getfixturevalue("activemq").stomp_port
    return "rabbitmq", None


def test_only_what_a_sites_key_signed_is_ingested_the_rest_is_dead_lettered_bad_signature(
        broker: tuple[str, int | None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "lst1"
    root.mkdir()
    key_file = tmp_path / "orm-2026.key"
    key_file.write_text(SECRET + "\n")
    monkeypatch.setenv("TEST_LPA_KEY", OTHER_SITE_SECRET)
    s = signed_settings(root, key_file, *broker)
    genuine = root / "run1.fits.fz"
    genuine.write_bytes(b"x" * 100)
    config = tmp_path / "injector.toml"
    config.write_text(toml_of(s, root, key_file, tmp_path / "outbox.sqlite"))

    def forged(n: int) -> FileClosed:
        return FileClosed.create(site="ORM", instrument="LST1", path=str(root / f"forged{n}.fits.fz"), size=n,
                                 adler32=f"{n:08x}", night="20261124")

    def sig(secret: str, body: bytes) -> str:
        return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()

    bodies = [encode(forged(i)) for i in range(1, 5)]
    lpa = encode(forged(5))  # an ORM event signed with La Palma's other key
    attacks = [
        Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", bodies[0], {}, "unsigned"),
        Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", bodies[1],
                 {KEY_ID: "orm-2026", SIGNATURE: sig("guessed" * 8, bodies[1])}, "wrong-secret"),
        Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", bodies[2].replace(b'"size":3', b'"size":4'),
                 {KEY_ID: "orm-2026", SIGNATURE: sig(SECRET, bodies[2])}, "altered"),
        Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", bodies[3],
                 {KEY_ID: "retired-2025", SIGNATURE: sig(SECRET, bodies[3])}, "unknown-key"),
        Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", lpa,
                 {KEY_ID: "lpa-2026", SIGNATURE: sig(OTHER_SITE_SECRET, lpa)}, "other-site"),
    ]
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/"})
    with declared(s):
        run("publish", str(genuine), "--site", "ORM", "--instrument", "LST1", "--night", "20261124", config=config)
        sender = plugin(s.broker.transport).sender(s.broker, Routes(s))
        try:
            sender.publish(attacks)
        finally:
            sender.close()
        worker = ingest_worker(s, rucio)
        with running(worker):
            wait_for(lambda: worker.stats.messages == 6, what="6 messages settled")
        dead = dead_letters(s)
    assert [name for _, _, name in rucio.pfns] == [str(genuine)], "only the signed file is registered"
    by_id = {d.id: d for d in dead}
    assert sorted(by_id) == sorted(m.message_id for m in attacks)
    for m in attacks:
        assert by_id[m.message_id].reason == "bad-signature"
        assert by_id[m.message_id].body == m.body, "the body is dead-lettered untouched"
    assert "requires signed events" in by_id["unsigned"].error
    assert "does not match the body" in by_id["wrong-secret"].error
    assert "does not match the body" in by_id["altered"].error
    assert "'retired-2025', which this configuration does not know" in by_id["unknown-key"].error
    assert "key 'lpa-2026' signs events of ['LPA'], not of site 'ORM'" in by_id["other-site"].error
    counted = worker.metrics.registry.get_sample_value(
        "rucio_injector_dead_letters_total", {"consumer": "ingest", "reason": "bad-signature"})
    assert counted == 5
    assert all(SECRET not in (d.error or "") for d in dead)
