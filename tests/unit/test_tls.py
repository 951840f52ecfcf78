"""TLS settings ([broker.tls], [cleanup.tls], amqps:// and stomp+ssl:// urls): each file checked at start-up with
a line that names it, and the options each transport's library is given. The handshakes themselves are tested
against the real brokers (tests/integration/test_tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from injector.config import load, parse
from injector.errors import ConfigError
from injector.testbed.tls import Pair, authority
from injector.tls import refusal
from injector.transport.amqp import ssl_options


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pair]:
    d = tmp_path_factory.mktemp("pki")
    ca = authority(d, "unit CA")
    return ca.cert, ca.issue(d, "ingest", client=True)


def test_a_tls_section_turns_tls_on_with_its_files_and_verify_on_by_default(pki):
    ca, client = pki
    s = parse({"broker": {"urls": ["amqp://ingest@rabbit.pic.es:5671//"],
                          "tls": {"ca_file": str(ca), "cert_file": str(client.cert), "key_file": str(client.key)}}})
    tls = s.broker.tls_settings
    assert tls is not None and tls.verify
    options = ssl_options(tls, s.broker.connect_urls[0])
    assert options == {"ca_certs": str(ca), "certfile": str(client.cert), "keyfile": str(client.key),
                       "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbit.pic.es"}
    assert parse({}).broker.tls_settings is None and ssl_options(None, "amqp://h//") is False


def test_amqps_and_stomp_ssl_urls_turn_tls_on_with_the_system_trust_store():
    s = parse({"broker": {"urls": ["amqps://ingest:pw@rabbit.pic.es//"]}})
    assert s.broker.tls_settings is not None and s.broker.tls_settings.ca_file is None
    stomp = parse({"broker": {"urls": ["stomp+ssl://u:p@amq.pic.es:61614"]}, "cleanup": {"flavour": "activemq",
                   "hermes_destination": "/topic/VirtualTopic.rucio.events"}})
    assert stomp.broker.transport == "stomp" and stomp.broker.stomp.tls is not None
    assert stomp.broker.stomp.addresses == (("amq.pic.es", 61614),)


def test_server_name_is_the_name_checked_instead_of_the_urls_host(pki):
    ca, _ = pki
    s = parse({"broker": {"urls": ["amqp://u@10.0.0.7:5671//"], "tls": {"ca_file": str(ca),
                                                                       "server_name": "rabbit.pic.es"}}})
    assert ssl_options(s.broker.tls_settings, s.broker.urls[0])["server_hostname"] == "rabbit.pic.es"  # type: ignore[index]


def test_verify_false_checks_nothing_and_refuses_a_ca_file_it_would_ignore(pki):
    ca, _ = pki
    s = parse({"broker": {"tls": {"verify": False}}})
    assert ssl_options(s.broker.tls_settings, s.broker.urls[0]) == {
        "ca_certs": None, "certfile": None, "keyfile": None, "cert_reqs": ssl.CERT_NONE}
    with pytest.raises(ConfigError, match=r"broker\.tls: .*verify = false checks no certificate"):
        parse({"broker": {"tls": {"verify": False, "ca_file": str(ca)}}})


@pytest.mark.parametrize(("tls", "says"), [
    ({"ca_file": "/nonexistent/ca.pem"}, r"broker\.tls: .*ca_file /nonexistent/ca.pem does not exist"),
    ({"cert_file": "/nonexistent/c.pem"}, r"cert_file /nonexistent/c.pem does not exist"),
    ({"key_file": "KEY"}, r"key_file without cert_file"),
])
def test_a_missing_file_or_a_key_without_its_certificate_is_one_line_naming_it(tls, says):
    with pytest.raises(ConfigError, match=says):
        parse({"broker": {"tls": tls}})


def test_a_file_that_is_not_pem_or_a_key_that_is_not_the_certificates_is_named(pki, tmp_path):
    ca, client = pki
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=rf"ca_file {junk} holds no PEM certificate"):
        parse({"broker": {"tls": {"ca_file": str(junk)}}})
    other = authority(tmp_path, "other CA")
    with pytest.raises(ConfigError, match=rf"cert_file {client.cert} / key_file {other.key}: not a PEM certificate "
                                          "with its unencrypted private key"):
        parse({"cleanup": {"tls": {"cert_file": str(client.cert), "key_file": str(other.key)}}})


def test_tls_is_for_every_url_of_a_broker_and_stomp_has_no_server_name(pki):
    with pytest.raises(ConfigError, match="some urls use TLS"):
        parse({"broker": {"urls": ["amqps://u:p@a//", "amqp://u:p@b//"]}})
    ca, _ = pki
    with pytest.raises(ConfigError, match=r"cleanup: .*server_name is not available over STOMP"):
        parse({"cleanup": {"tls": {"ca_file": str(ca), "server_name": "amq.pic.es"}}})


def test_cleanup_tls_is_the_stomp_servers(pki):
    ca, client = pki
    s = parse({"cleanup": {"stomp_hosts": ["amq.pic.es:61614"],
                           "tls": {"ca_file": str(ca), "cert_file": str(client.cert), "key_file": str(client.key)}}})
    assert s.cleanup.server.tls == s.cleanup.tls and s.cleanup.tls is not None
    assert s.cleanup.tls.file("ca_file") == str(ca)


def test_tls_settings_come_from_the_environment_like_every_field(pki, tmp_path):
    ca, _ = pki
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    s = load(cfg, env={"RUCIO_INJECTOR__BROKER__TLS__CA_FILE": str(ca),
                       "RUCIO_INJECTOR__CLEANUP__TLS__VERIFY": "true"})
    assert s.broker.tls is not None and s.broker.tls.ca_file == str(ca)
    assert s.cleanup.tls is not None and s.cleanup.tls.verify


def test_each_tls_refusal_is_one_line_saying_which_side_refused_and_what_to_check():
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "unable to get local issuer certificate"
    assert refusal(err) == ("TLS: the server's certificate is not trusted (unable to get local issuer certificate):"
                            " check ca_file, and that the certificate names the host (or server_name)")

    def ssl_error(reason: str) -> ssl.SSLError:
        e = ssl.SSLError(1, f"[SSL: {reason}] ...")
        e.reason = reason  # type: ignore[misc]
        return e

    assert "does not speak TLS on this port" in str(refusal(ssl_error("WRONG_VERSION_NUMBER")))
    assert "wants a client certificate" in str(refusal(ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED")))
    assert "refused our client certificate" in str(refusal(ssl_error("TLSV1_ALERT_UNKNOWN_CA")))
    assert refusal(ConnectionRefusedError(111, "refused")) is None


def test_a_certificate_login_needs_a_certificate_and_amqp(pki):
    ca, client = pki
    with pytest.raises(ConfigError, match="certificate_login needs cert_file"):
        parse({"broker": {"tls": {"ca_file": str(ca), "certificate_login": True}}})
    with pytest.raises(ConfigError, match="certificate_login is for AMQP"):
        parse({"broker": {"urls": ["stomp+ssl://u:p@amq:61614"], "tls": {
            "cert_file": str(client.cert), "key_file": str(client.key), "certificate_login": True}},
               "cleanup": {"flavour": "activemq", "hermes_destination": "/topic/VirtualTopic.x"}})
    s = parse({"broker": {"urls": ["amqps://rabbit.pic.es//"], "tls": {
        "cert_file": str(client.cert), "key_file": str(client.key), "certificate_login": True}}})
    assert s.broker.tls is not None and s.broker.tls.certificate_login
