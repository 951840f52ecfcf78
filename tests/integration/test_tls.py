"""TLS on the real brokers, with client certificates: the machine's RabbitMQ (AMQP on 5671, STOMP on 61614, both
wanting a client certificate: ssl_options.verify = verify_peer, fail_if_no_peer_cert = true; set up by `make setup`,
injector/testbed/tls.py) and a throw-away ActiveMQ with its stomp+ssl connector (needClientAuth) and a CA this test
makes. The pipeline runs over TLS (the DAQ's publish, ingest, its dead letters, `broker setup`, `dlq list`,
`status`, cleanup on ActiveMQ); a server certificate from another CA, a wrong name, no client certificate, a client
certificate from another CA and a plain port are each refused with one line saying which and why."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import pytest

from consumers.services import ingest_worker
from injector.config import Broker, Settings, StompServer, Tls, parse
from injector.errors import BrokerUnavailable
from injector.exits import BROKER
from injector.testbed.activemq import ActiveMQ, BrokerTls, start_activemq
from injector.testbed.rucio import free_port
from injector.testbed.tls import AMQPS_PORT, STOMPS_PORT, Authority, Pair, authority, java_stores, machine_authority
from injector.testing import FakeRucio
from injector.transport.amqp import connection
from injector.transport.stomp import open_connection
from tests.conftest import STREAMS
from tests.integration.cli import run
from tests.integration.conftest import SOURCE, Lab
from tests.integration.hermes import HermesSender
from tests.integration.rabbit import (
    daq_publisher,
    dead_letters,
    declared,
    ingested,
    rabbitmqctl,
    running,
    unique_settings,
    wait_for,
)
from tests.integration.test_amqp import ev
from tests.integration.test_cleanup_transport import Recorder, worker_for
from tests.integration.test_ingest_rucio import files
from tests.integration.test_reconcile_rucio import config_file, settings_for

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the broker's certificate chains to (and its client certificates must)
    client: Pair  # a client certificate it issued
    other_ca: Path  # a CA nobody here trusts
    intruder: Pair  # a client certificate that CA issued

    def tls(self, **over: Any) -> dict[str, Any]:
        return {"ca_file": str(self.ca), "cert_file": str(self.client.cert), "key_file": str(self.client.key), **over}


def pki_of(ca: Authority, directory: Path) -> Pki:
    other = authority(directory / "other", "other CA")
    return Pki(ca.cert, ca.issue(directory, "rucio-injector", client=True), other.cert,
               other.issue(directory / "other", "intruder", client=True))


@pytest.fixture(scope="module")
def rabbit_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Client certificates from the CA the machine's RabbitMQ TLS listeners trust, and a foreign CA's."""
    return pki_of(machine_authority(), tmp_path_factory.mktemp("rabbit-pki"))


def over_tls(s: Settings, pki: Pki, **tls: Any) -> Settings:
    """`s` with its broker spoken to over TLS (the machine's RabbitMQ, 5671) as the client `pki` names."""
    data = s.model_dump(mode="json")
    data["broker"]["urls"] = [f"amqps://guest:guest@localhost:{AMQPS_PORT}//"]
    data["broker"]["tls"] = pki.tls(**tls)
    return parse(data)


def tls_section(path: Path, section: str, tls: dict[str, Any]) -> Path:
    """The config file at `path` with a [<section>.tls] table added."""
    lines = [f"[{section}.tls]"] + [f"{k} = {json.dumps(v)}" for k, v in tls.items()]
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


def test_the_pipeline_and_the_operators_tools_run_over_tls_with_a_client_certificate(lab: Lab, rabbit_pki: Pki,
                                                                                     tmp_path: Path) -> None:
    plain = settings_for(lab)
    s = over_tls(plain, rabbit_pki)
    cfg = tls_section(config_file(s, tmp_path / "injector.toml"), "broker", rabbit_pki.tls())
    (good,) = files(lab, 1)
    stray = tmp_path / "stray.fits"
    stray.write_bytes(b"from an instrument no stream takes")
    with declared(plain):
        run("broker", "setup", config=cfg)  # declares it again, over TLS
        published = run("publish", "--site", "ORM", "--instrument", "NOSUCH", str(stray), config=cfg,
                        env={"XDG_STATE_HOME": str(tmp_path / "state")})
        assert "published" in published.stdout + published.stderr
        with daq_publisher(s) as daq:  # the DAQ's library over TLS
            daq.publish([good])
        worker = ingest_worker(s)  # an ingest consumer over TLS: registers one, dead-letters the stray
        with running(worker):
            wait_for(lambda: worker.stats.messages == 2, timeout=60, what="ingest of both events")
        wait_for(lambda: len(dead_letters(plain)) == 1, what="the stray's dead letter")
        assert lab.replicas([good.path])[good.path]["states"] == {SOURCE: "AVAILABLE"}
        listing = run("dlq", "list", config=cfg)
        assert "1 dead letter(s)" in listing.stdout and "no-stream" in listing.stdout, listing.stdout
        shown = json.loads(run("status", "--json", config=cfg).stdout)
    assert shown["dead_letters_without_stream"] == {"(no-stream)": 1}
    assert shown["queues"][s.ingest.queue]["messages"] == 0, shown["queues"]
    assert sum(d.get("registered", 0) for d in shown["streams"]["lst1-raw"].values()) == 1, shown["streams"]


@pytest.mark.parametrize(("case", "says"), [
    ("other-ca", re.escape("the server's certificate is not trusted (self-signed certificate in certificate "
                           "chain): check ca_file")),
    ("wrong-name", re.escape("the server's certificate is not trusted (Hostname mismatch, certificate is not valid "
                             "for 'rabbit.pic.es'.)")),
    ("no-client-certificate", "the server (wants a client certificate|ended the TLS session at once)"),
    ("foreign-client-certificate", "the server (refused our client certificate|ended the TLS session at once)"),
    ("plain-port", "the server does not speak TLS on this port"),
])
def test_rabbitmq_over_tls_refuses_each_wrong_certificate_in_one_line_saying_which(rabbit_pki: Pki, case: str,
                                                                                  says: str) -> None:
    p = rabbit_pki
    tls, port = {
        "other-ca": (p.tls(ca_file=str(p.other_ca)), AMQPS_PORT),
        "wrong-name": (p.tls(server_name="rabbit.pic.es"), AMQPS_PORT),
        "no-client-certificate": ({"ca_file": str(p.ca)}, AMQPS_PORT),
        "foreign-client-certificate": (p.tls(cert_file=str(p.intruder.cert), key_file=str(p.intruder.key)),
                                       AMQPS_PORT),
        "plain-port": (p.tls(), 5672),
    }[case]
    broker = Broker(urls=[f"amqp://guest:guest@localhost:{port}//"], tls=Tls(**tls), connect_attempts=1)
    with pytest.raises(BrokerUnavailable) as refused:
        connection(broker).release()
    assert re.search(rf"amqp://localhost:{port}// \(TLS: {says}", str(refused.value)), str(refused.value)
    assert "guest" not in str(refused.value)


def test_the_cli_refuses_a_broker_certificate_from_another_ca_with_one_line_and_the_broker_exit_code(
        rabbit_pki: Pki, tmp_path: Path) -> None:
    cfg = tmp_path / "injector.toml"
    cfg.write_text(f'[broker]\nurls = ["amqps://guest:guest@localhost:{AMQPS_PORT}//"]\nconnect_attempts = 1\n')
    tls_section(cfg, "broker", rabbit_pki.tls(ca_file=str(rabbit_pki.other_ca)))
    refused = run("broker", "setup", config=cfg, expect=BROKER)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "the server's certificate is not trusted" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr and "guest:guest" not in refused.stderr


def test_stomp_over_tls_on_rabbitmq_connects_with_the_ca_and_a_client_certificate_and_refuses_without(
        rabbit_pki: Pki) -> None:
    p = rabbit_pki

    def server(**tls: Any) -> StompServer:
        return StompServer((("localhost", STOMPS_PORT),), "guest", "guest", tls=Tls(**tls))

    conn, _, _ = open_connection(server(**p.tls()), {}, heartbeats=False)
    assert conn.is_connected()
    conn.disconnect()
    for tls, says in ((p.tls(ca_file=str(p.other_ca)), "the server's certificate is not trusted"),
                      ({"ca_file": str(p.ca)}, "the server (wants a client certificate|ended the TLS session)"),
                      (p.tls(cert_file=str(p.intruder.cert), key_file=str(p.intruder.key)),
                       "the server (refused our client certificate|ended the TLS session)")):
        with pytest.raises(BrokerUnavailable, match=rf"STOMP localhost:{STOMPS_PORT}\b.*TLS: {says}"):
            open_connection(server(**tls), {}, heartbeats=False)


@pytest.fixture(scope="module")
def activemq_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ActiveMQ, Pki]]:
    """A throw-away ActiveMQ whose stomp+ssl connector wants a client certificate, with a CA made here."""
    d = tmp_path_factory.mktemp("activemq-tls")
    ca = authority(d / "pki", "site CA")
    keystore, truststore = java_stores(d, ca.issue(d / "pki", "activemq"), ca.cert, "changeit")
    tls = BrokerTls(keystore, truststore, "changeit", free_port())
    with start_activemq(d / "broker", tls=tls) as amq:
        yield amq, pki_of(ca, d / "pki")


def test_an_activemq_site_runs_over_stomp_ssl_with_client_certificates(activemq_tls: tuple[ActiveMQ, Pki],
                                                                        tmp_path: Path) -> None:
    amq, p = activemq_tls
    port = amq.tls.port if amq.tls else 0
    tag = tmp_path.name[-8:].replace("_", "-").lower()
    s = unique_settings(STREAMS, broker={"urls": [f"stomp+ssl://guest:guest@localhost:{port}"], "tls": p.tls()},
                        cleanup={"flavour": "activemq", "stomp_hosts": [f"localhost:{port}"], "tls": p.tls(),
                                 "app": f"app-{tag}", "hermes_destination": f"/topic/VirtualTopic.t-{tag}",
                                 "heartbeat_ms": 1000, "batch_window": 0.05},
                        ingest={"batch_window": 0.05})
    rucio = FakeRucio(rses={"ORM-BUFFER": "file://localhost/data/"})
    with declared(s):
        ingested(s, [ev(1), ev(2, instrument="NOSUCH")], rucio)  # publish and ingest over stomp+ssl
        assert [r.reason for r in dead_letters(s)] == ["no-stream"]
        assert list(rucio.files) == [("lst", "/data/lst1/run00001.fits.fz")]
        cfg = tmp_path / "injector.toml"
        cfg.write_text(f'[broker]\nurls = ["{s.broker.urls[0]}"]\n[ingest]\nqueue = "{s.ingest.queue}"\n'
                       f'[cleanup]\nflavour = "activemq"\nstomp_hosts = ["localhost:{port}"]\napp = "{s.cleanup.app}"\n'
                       f'hermes_destination = "{s.cleanup.hermes_destination}"\n')
        tls_section(tls_section(cfg, "broker", p.tls()), "cleanup", p.tls())
        listing = run("dlq", "list", config=cfg)
        assert "1 dead letter(s)" in listing.stdout and "no-stream" in listing.stdout, listing.stdout
        # cleanup's link: hermes' events on the virtual topic, read over stomp+ssl
        recorder = Recorder()
        worker = worker_for(s, recorder)
        with running(worker):
            wait_for(lambda: worker.metrics.health()[0], timeout=20, what="the cleanup link subscribed")
            with HermesSender(s) as hermes:  # hermes over stomp+ssl too ([cleanup.tls] is its broker's)
                hermes.send_raw("an event")
            wait_for(lambda: recorder.seen == [b"an event"], what="hermes' event over stomp+ssl")
    with pytest.raises(BrokerUnavailable, match=rf"STOMP localhost:{port}\b.*TLS: the server (wants a client "
                                                "certificate|ended the TLS session)"):
        open_connection(StompServer((("localhost", port),), "guest", "guest", tls=Tls(ca_file=str(p.ca))), {},
                        heartbeats=False)
    with pytest.raises(BrokerUnavailable, match=rf"STOMP localhost:{port}\b.*TLS: the server (refused our client "
                                                "certificate|ended the TLS session)"):
        open_connection(StompServer((("localhost", port),), "guest", "guest",
                                    tls=Tls(**p.tls(cert_file=str(p.intruder.cert), key_file=str(p.intruder.key)))),
                        {}, heartbeats=False)
    with pytest.raises(BrokerUnavailable, match="TLS: the server's certificate is not trusted"):
        open_connection(StompServer((("localhost", port),), "guest", "guest",
                                    tls=Tls(**p.tls(ca_file=str(p.other_ca)))), {}, heartbeats=False)


def test_a_client_certificate_can_be_the_login_and_one_no_user_is_named_after_is_refused(rabbit_pki: Pki,
                                                                                      tmp_path: Path) -> None:
    """RabbitMQ's EXTERNAL mechanism: the user is the certificate's CN, no password anywhere. The user here may
    declare nothing, which shows the login is the certificate's and not the url's guest."""
    user = f"t-{secrets.token_hex(4)}-cert"
    client = machine_authority().issue(tmp_path, user, client=True)
    rabbitmqctl("add_user", user, secrets.token_hex(16))
    rabbitmqctl("clear_password", user)  # a certificate is its only way in
    rabbitmqctl("set_permissions", "-p", "/", user, "^$", "^$", "^$")
    try:
        tls = {"ca_file": str(rabbit_pki.ca), "cert_file": str(client.cert), "key_file": str(client.key),
               "certificate_login": True}
        conn = connection(Broker(urls=[f"amqps://localhost:{AMQPS_PORT}//"], tls=Tls(**tls), connect_attempts=1))
        try:
            with pytest.raises(amqp.exceptions.AccessRefused, match=f"user '{user}'"):
                conn.channel().queue_declare(f"t-{user}", durable=False, auto_delete=True)
        finally:
            conn.release()
        stranger = machine_authority().issue(tmp_path / "stranger", "nobody-is-named-so", client=True)
        cfg = tmp_path / "injector.toml"
        cfg.write_text(f'[broker]\nurls = ["amqps://localhost:{AMQPS_PORT}//"]\nconnect_attempts = 1\n')
        tls_section(cfg, "broker", {**tls, "cert_file": str(stranger.cert), "key_file": str(stranger.key)})
        refused = run("broker", "setup", config=cfg, expect=BROKER)
        assert "refused our certificate login" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, \
            refused.stderr
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=120)
