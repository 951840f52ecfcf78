"""Signed file-closed events: HMAC-SHA256 over the message body, exactly the bytes sent, with the key's id.

A DAQ that holds a key sends two headers with each file-closed message:

    injector-key-id:    the key's id, as in [signing.keys.<id>]
    injector-signature: hex HMAC-SHA256 of the body bytes, keyed with the key's secret (its text, as UTF-8)

The body is never re-encoded by anyone on the way (the outbox, the broker, a dead-letter queue and a replay keep
its bytes), so the signature covers exactly what ingest decodes. Ingest checks every event before it touches
Rucio (`Keyring.check`): a signature naming an unknown key, a key not given to the event's site, or not matching
the body is refused whatever the stream; an unsigned event is refused when its stream says `require_signature`.
A refused event is dead-lettered `bad-signature`, its body untouched. Replaying a genuine signed event does no harm
(ingest is idempotent), so there is no nonce.

Secrets are read here, from the key's file or environment variable, and kept only in the Keyring (never in
Settings, logs or messages): `Keyring.load(settings.signing)`. Two keys for one site are both accepted, so a site
rotates by adding the new key, switching its DAQ to it, then removing the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from injector.config import Signing, Stream, secret_file
from injector.errors import BadSignature, ConfigError, NoStream
from injector.events import FileClosed
from injector.logs import keep_secret
from injector.streams import match

KEY_ID = "injector-key-id"
SIGNATURE = "injector-signature"
MIN_SECRET = 32  # bytes: `openssl rand -hex 32` gives 64


@dataclass(frozen=True)
class _Key:
    id: str
    secret: bytes = field(repr=False)
    sites: frozenset[str]


def signature(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


class Keyring:
    """The keys a process may check and sign with, read once at start-up."""

    def __init__(self, keys: Mapping[str, _Key] | None = None, sign_with: str | None = None) -> None:
        self._keys = dict(keys or {})
        self._sign_with = sign_with

    def __repr__(self) -> str:
        return f"Keyring(keys={sorted(self._keys)}, sign_with={self._sign_with!r})"

    @classmethod
    def load(cls, signing: Signing, env: Mapping[str, str] | None = None) -> Keyring:
        """Read every key's secret; ConfigError names the key and where its secret should be (never the secret)."""
        env = os.environ if env is None else env
        keys = {}
        for key_id, k in signing.keys.items():
            if k.file is not None:
                where = f"file {k.file}"
                raw = secret_file(k.file, f"signing key {key_id!r}: cannot read its file").encode()
            else:
                where = f"environment variable {k.env}"
                value = env.get(str(k.env))
                if value is None:
                    raise ConfigError(f"signing key {key_id!r}: the {where} is not set")
                raw = value.encode()
            secret = raw.strip()
            if len(secret) < MIN_SECRET:
                raise ConfigError(f"signing key {key_id!r}: the secret in its {where} is {len(secret)} bytes; at "
                                  f"least {MIN_SECRET} are needed (make one with `openssl rand -hex 32`)")
            keep_secret(secret.decode(errors="replace"))
            keys[key_id] = _Key(key_id, secret, frozenset(k.sites))
        return cls(keys, signing.sign_with)

    @property
    def signs(self) -> bool:
        return self._sign_with is not None

    def headers(self, body: bytes) -> dict[str, str]:
        """The signature headers of a body, with the `sign_with` key (none when the process does not sign)."""
        if self._sign_with is None:
            return {}
        key = self._keys[self._sign_with]
        return {KEY_ID: key.id, SIGNATURE: signature(key.secret, body)}

    def check(self, event: FileClosed, body: bytes, headers: Mapping[str, Any], streams: list[Stream]) -> None:
        """Returns when the event may be ingested; BadSignature says why not (which key, which site)."""
        key_id, sig = headers.get(KEY_ID), headers.get(SIGNATURE)
        eid = str(event.event_id)
        if key_id is None and sig is None:
            try:
                stream = match(streams, event.site, event.instrument, event.datatype)
            except NoStream:
                return  # ingest dead-letters it no-stream
            if stream.require_signature:
                raise BadSignature(f"event {eid}: stream {stream.name!r} requires signed events and this one is "
                                   f"unsigned (no {KEY_ID}/{SIGNATURE} headers)", event_id=eid)
            return
        if not isinstance(key_id, str) or not isinstance(sig, str):
            raise BadSignature(f"event {eid}: a signed event needs both headers {KEY_ID} and {SIGNATURE} as text",
                               event_id=eid)
        key = self._keys.get(key_id)
        if key is None:
            raise BadSignature(f"event {eid}: signed with key {key_id[:64]!r}, which this configuration does not "
                               "know (removed after a rotation, or forged)", event_id=eid)
        if event.site not in key.sites:
            raise BadSignature(f"event {eid}: key {key_id!r} signs events of {sorted(key.sites)}, not of site "
                               f"{event.site!r}", event_id=eid)
        if not hmac.compare_digest(signature(key.secret, body), sig.strip().lower()):
            raise BadSignature(f"event {eid}: the {SIGNATURE} does not match the body for key {key_id!r}: forged, "
                               "or altered after signing", event_id=eid)
