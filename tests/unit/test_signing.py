"""Signed file-closed events (injector.signing): what is accepted, what is refused and how the refusal reads."""

from __future__ import annotations

import copy
import hashlib
import hmac
import subprocess
from pathlib import Path

import pytest

from consumers.services import decode_each, file_closed_of
from injector.config import parse
from injector.errors import BadSignature, ConfigError
from injector.events import FileClosed
from injector.messages import Delivery
from injector.signing import KEY_ID, SIGNATURE, Keyring
from producers.publish import outgoing
from tests.conftest import STREAMS

SECRET_A = "a" * 64
SECRET_B = "b" * 64
SECRET_LP = "c" * 64


def settings(require: bool = True, sign_with: str | None = "orm-2026a", **extra_keys: dict) -> object:
    data = copy.deepcopy(STREAMS)
    data["streams"][0]["require_signature"] = require
    data["signing"] = {"sign_with": sign_with, "keys": {
        "orm-2026a": {"sites": ["ORM"], "env": "KEY_A"},
        "orm-2026b": {"sites": ["ORM"], "env": "KEY_B"},
        "lapalma-other": {"sites": ["LPA"], "env": "KEY_LP"},
        **extra_keys}}
    return parse(data)


ENV = {"KEY_A": SECRET_A, "KEY_B": SECRET_B + "\n", "KEY_LP": SECRET_LP}


def event(**over: object) -> FileClosed:
    fields = dict(site="ORM", instrument="LST1", path="/data/lst1/run1.fits.fz", size=1, adler32="00000001",
                  night="20261124")
    fields.update(over)
    return FileClosed.create(**fields)


def delivery(body: bytes, headers: dict) -> Delivery:
    return Delivery(body, headers, "daq", "file.closed.ORM.LST1", 1, False, None, "application/json")


def decoded(s, keyring: Keyring, body: bytes, headers: dict):
    (out,) = decode_each([delivery(body, headers)], file_closed_of(s, keyring))
    return out


def test_an_event_the_publisher_signed_is_accepted_with_either_key_of_its_site():
    s = settings()
    for key in ("orm-2026a", "orm-2026b"):  # rotation: both keys of the site are valid at once
        e = event()
        m = outgoing(e, "daq", Keyring.load(settings(sign_with=key).signing, ENV))
        assert m.headers[KEY_ID] == key
        assert decoded(s, Keyring.load(s.signing, ENV), m.body, m.headers) == e


def test_the_signature_is_hmac_sha256_of_the_body_bytes_with_the_secret_text():
    """What the README tells a DAQ in another language: hex HMAC-SHA256 of exactly the bytes sent."""
    s = settings()
    m = outgoing(event(), "daq", Keyring.load(s.signing, ENV))
    assert m.headers[SIGNATURE] == hmac.new(SECRET_A.encode(), m.body, hashlib.sha256).hexdigest()
    upper = {**m.headers, SIGNATURE: m.headers[SIGNATURE].upper()}  # hex digits in either case
    assert isinstance(decoded(s, Keyring.load(s.signing, ENV), m.body, upper), FileClosed)


@pytest.mark.parametrize("forge, why", [
    (lambda b, h: (b.replace(b'"size":1', b'"size":2'), h), "does not match the body for key 'orm-2026a'"),
    (lambda b, h: (b, {**h, SIGNATURE: "0" * 64}), "does not match the body"),
    (lambda b, h: (b, {**h, KEY_ID: "stolen-key"}), "key 'stolen-key', which this configuration does not know"),
    (lambda b, h: (b, {KEY_ID: h[KEY_ID]}), "needs both headers"),
    (lambda b, h: (b, {SIGNATURE: h[SIGNATURE]}), "needs both headers"),
    (lambda b, h: (b, {}), "stream 'lst1-raw' requires signed events and this one is unsigned"),
])
def test_a_forged_altered_or_unsigned_event_is_refused_bad_signature_saying_why(forge, why):
    s = settings()
    m = outgoing(event(), "daq", Keyring.load(s.signing, ENV))
    body, headers = forge(m.body, dict(m.headers))
    refused = decoded(s, Keyring.load(s.signing, ENV), body, headers)
    assert isinstance(refused, BadSignature) and refused.reason == "bad-signature"
    assert why in str(refused) and refused.event_id is not None and refused.event_id in str(refused)
    assert SECRET_A not in str(refused)


def test_a_key_of_another_site_cannot_sign_this_sites_events():
    s = settings()
    m = outgoing(event(), "daq", Keyring.load(settings(sign_with="lapalma-other").signing, ENV))
    refused = decoded(s, Keyring.load(s.signing, ENV), m.body, m.headers)
    assert isinstance(refused, BadSignature)
    assert "key 'lapalma-other' signs events of ['LPA'], not of site 'ORM'" in str(refused)


def test_a_stream_that_does_not_require_signatures_takes_unsigned_events_but_never_a_bad_signature():
    s = settings(require=False)
    keyring = Keyring.load(s.signing, ENV)
    m = outgoing(event(), "daq")
    assert isinstance(decoded(s, keyring, m.body, m.headers), FileClosed)
    forged = {**m.headers, KEY_ID: "orm-2026a", SIGNATURE: "ab" * 32}
    assert isinstance(decoded(s, keyring, m.body, forged), BadSignature)


def test_an_event_of_no_stream_is_left_to_ingest_which_refuses_it_no_stream():
    s = settings()
    m = outgoing(event(instrument="CTA"), "daq")
    assert isinstance(decoded(s, Keyring.load(s.signing, ENV), m.body, m.headers), FileClosed)


def test_secrets_come_from_files_or_the_environment_and_never_show(tmp_path: Path):
    key = tmp_path / "orm.key"
    key.write_text(SECRET_A + "\n")
    data = copy.deepcopy(STREAMS)
    data["signing"] = {"sign_with": "f", "keys": {"f": {"sites": ["ORM"], "file": str(key)}}}
    keyring = Keyring.load(parse(data).signing, {})
    assert keyring.headers(b"x")[SIGNATURE] == hmac.new(SECRET_A.encode(), b"x", hashlib.sha256).hexdigest()
    assert SECRET_A not in repr(keyring) and SECRET_A not in repr(parse(data))


@pytest.mark.parametrize("key, env, message", [
    ({"sites": ["ORM"], "file": "/nonexistent/orm.key"}, {}, "signing key 'k': cannot read its file /nonexistent"),
    ({"sites": ["ORM"], "env": "NOPE"}, {}, "signing key 'k': the environment variable NOPE is not set"),
    ({"sites": ["ORM"], "env": "SHORT"}, {"SHORT": "tooshort"}, "is 8 bytes; at least 32 are needed"),
])
def test_a_key_that_cannot_be_read_stops_the_start_with_where_it_was_looked_for(key, env, message):
    data = copy.deepcopy(STREAMS)
    data["signing"] = {"keys": {"k": key}}
    with pytest.raises(ConfigError, match=message) as exc:
        Keyring.load(parse(data).signing, env)
    assert "tooshort" not in str(exc.value)


@pytest.mark.parametrize("signing, message", [
    ({"keys": {"k": {"sites": ["ORM"], "file": "/a", "env": "B"}}}, "exactly one of file"),
    ({"keys": {"k": {"sites": ["ORM"]}}}, "exactly one of file"),
    ({"keys": {"k": {"sites": ["ORM"], "secret": "inline"}}}, "secret"),
    ({"sign_with": "nope", "keys": {}}, "sign_with names key 'nope'"),
    ({"keys": {"k": {"sites": ["LPA"], "env": "K"}}}, "stream 'lst1-raw' requires signatures, but no"),
])
def test_signing_config_mistakes_are_refused_at_load(signing, message):
    data = copy.deepcopy(STREAMS)
    data["streams"][0]["require_signature"] = True
    data["signing"] = signing
    with pytest.raises(ConfigError, match=message):
        parse(data)


def test_the_shell_signer_for_daqs_in_other_languages_signs_as_ingest_checks(tmp_path: Path):
    """producers/sign-file-closed.sh, the README's example for a DAQ not written in Python, with openssl."""
    s = settings()
    key = tmp_path / "orm-2026a.key"
    key.write_text(SECRET_A + "\n")
    e = event()
    body = outgoing(e, "daq").body
    script = Path(__file__).parents[2] / "producers" / "sign-file-closed.sh"
    done = subprocess.run(["sh", str(script), "orm-2026a", str(key)], input=body, capture_output=True, check=True)
    headers = dict(line.split(": ", 1) for line in done.stdout.decode().splitlines())
    assert set(headers) == {KEY_ID, SIGNATURE}
    assert decoded(s, Keyring.load(s.signing, ENV), body, headers) == e
    assert isinstance(decoded(s, Keyring.load(s.signing, ENV), body + b" ", headers), BadSignature)
