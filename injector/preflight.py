"""Preflight: the streams checked against Rucio before `ingest` or `cleanup` start, and by `config check --rucio`.

`check()` returns one Problem per thing wrong: an `error` is what Rucio would refuse for certain (every event of
the stream would be dead-lettered, or its replicas deleted before they are archived); a `warning` is risky, or
depends on the server's permission policy, which a client cannot read (the rules below are those of Rucio's
`generic` policy). A Rucio outage is no problem of the configuration: it leaves as RucioUnavailable, and the
caller waits and asks again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from injector.config import Rule, Settings, Stream
from injector.errors import ConfigError, Permanent
from injector.gateway import AccountInfo, RucioPreflight

log = logging.getLogger(__name__)

Severity = Literal["error", "warning"]
Verb = Literal["ingest", "cleanup", "all"]
# The generic policy lets any account add replicas at RSEs named like these (perm_add_replicas).
OPEN_RSE_SUFFIXES = ("SCRATCHDISK", "USERDISK", "MOCK", "LOCALGROUPDISK")


@dataclass(frozen=True)
class Problem:
    severity: Severity
    stream: str
    message: str  # what, why, and how to fix it

    def line(self) -> str:
        return f"{self.severity.upper():<7} {self.stream}: {self.message}"


def _problem(severity: Severity, stream: Stream, what: str, why: str, fix: str) -> Problem:
    return Problem(severity, stream.name, _one_line(f"{what}: {why.rstrip('.')}. Fix: {fix}"))


def _admin(account: AccountInfo) -> str:
    return (f"give the account the attribute admin (rucio-admin account add-attribute --key admin --value True "
            f"{account.name})")


def _one_line(text: str) -> str:
    """Rucio's messages span lines ("...invalid.\nDetails: ..."); a problem is one line."""
    return " ".join(text.split())


def check(settings: Settings, rucio: RucioPreflight, verb: Verb = "all") -> list[Problem]:
    """Every problem of every stream for `verb` (ingest, cleanup, or all); raises RucioUnavailable when Rucio
    cannot be reached."""
    try:
        account, scopes = rucio.account_info(), rucio.scope_names()
    except Permanent as exc:
        return [Problem("error", "*", _one_line(f"Rucio refused to say who we are: {exc}. Fix: check the "
                                                f"rucio-clients configuration (RUCIO_CONFIG: host, account)"))]
    rses: dict[str, dict[str, Any] | None] = {}
    problems: list[Problem] = []
    for stream in settings.streams:
        try:
            if stream.source_rse not in rses:
                rses[stream.source_rse] = rucio.find_rse(stream.source_rse)
            problems += _source(stream, rses[stream.source_rse], account, verb)
            problems += _scope(stream, scopes, account)
            for rule in stream.rules:
                problems += _rule(stream, rule, rucio, account, verb)
        except Permanent as exc:  # e.g. a read this account may not do: unknown, not known bad
            problems.append(_problem("warning", stream, "not fully checked", f"Rucio refused a read: {exc}",
                                     "check this stream by hand"))
    return problems


def enforce(problems: Sequence[Problem], verb: str) -> None:
    """Log the warnings; refuse to start (ConfigError naming each one) when there is an error."""
    for p in problems:
        if p.severity == "warning":
            log.warning("%s start-up check: %s", verb, p.line())
    errors = [p.line() for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(f"{verb} refuses to start, {len(errors)} problem(s) with the streams in Rucio:\n  "
                          + "\n  ".join(errors))


def _source(stream: Stream, info: dict[str, Any] | None, account: AccountInfo, verb: Verb) -> list[Problem]:
    rse = stream.source_rse
    what = f"source_rse {rse}"
    if info is None:
        return [_problem("error", stream, what, "no such RSE in Rucio (every event would be refused)",
                         "add it (rucio-admin rse add --non-deterministic RSE, with a protocol covering pfn_prefix "
                         "+ storage_root) or correct source_rse")]
    out = []
    if verb != "cleanup":
        out += _registration(stream, info, account)
    if verb != "ingest" and stream.release_source and not account.admin:
        out.append(_problem("warning", stream, what, f"account {account.name} is not admin: under the generic "
                            f"policy only root or admin may set the tombstone that releases a source",
                            f"{_admin(account)}, or set release_source = false"))
    return out


def _registration(stream: Stream, info: dict[str, Any], account: AccountInfo) -> list[Problem]:
    """What add_replicas needs from the source RSE."""
    what, out = f"source_rse {stream.source_rse}", []
    if info.get("deterministic"):
        out.append(_problem("error", stream, what, "it is deterministic: Rucio accepts there only the paths it "
                            "computes itself, never the file's own detector path", "use a non-deterministic RSE "
                            "over the DAQ buffer (rucio-admin rse add --non-deterministic RSE)"))
    if info.get("volatile"):
        out.append(_problem("error", stream, what, "it is volatile: Rucio refuses to add replicas there",
                            "use a non-volatile RSE"))
    delay = (info.get("attributes") or {}).get("tombstone_delay")
    if delay not in (None, "", 0, "0"):
        out.append(_problem("error", stream, what, f"it has the attribute tombstone_delay={delay}: every replica "
                            "registered there gets a tombstone, and the reaper may delete it before it is archived",
                            f"delete the attribute (rucio-admin rse delete-attribute --rse {stream.source_rse} "
                            f"--key tombstone_delay --value {delay})"))
    why = pfn_refused(stream, info.get("protocols") or [])
    if why:
        out.append(_problem("error", stream, f"{what}, pfn_prefix {stream.pfn_prefix!r} + storage_root "
                            f"{stream.storage_root!r}", f"Rucio would refuse these PFNs: {why}",
                            "add a protocol covering them, or correct pfn_prefix / storage_root"))
    if not account.admin:
        out += _registration_rights(stream, info, account)
    return out


def _registration_rights(stream: Stream, info: dict[str, Any], account: AccountInfo) -> list[Problem]:
    what, out = f"source_rse {stream.source_rse}", []
    if not stream.source_rse.endswith(OPEN_RSE_SUFFIXES):
        out.append(_problem("warning", stream, what, f"account {account.name} is not admin: under the generic "
                            f"policy only root or admin may add replicas there (or at RSEs named *"
                            f"{', *'.join(OPEN_RSE_SUFFIXES)})", f"{_admin(account)}, unless your server's policy "
                            "allows it"))
    if info.get("availability_write") is False:
        out.append(_problem("warning", stream, what, "it is not available for writing: Rucio refuses replicas "
                            "there from accounts that are not admin (retried until it is)",
                            "set availability_write back to true once its downtime is over"))
    return out


def pfn_refused(stream: Stream, protocols: Sequence[dict[str, Any]]) -> str | None:
    """Why Rucio would refuse the stream's PFNs at registration (None: it accepts them). As Rucio does: the
    protocol of the PFN's scheme with the best WAN write priority must match its hostname, port and prefix."""
    url = urlparse(stream.pfn_prefix + stream.storage_root.rstrip("/") + "/")
    host, port, path = url.hostname or "", url.port or 0, re.sub("/+", "/", url.path)
    writable = [p for p in protocols if p.get("scheme") == url.scheme and _write_priority(p)]
    if not writable:
        schemes = sorted({str(p.get("scheme")) for p in protocols}) or ["none"]
        return f"no protocol of scheme {url.scheme!r} that writes (WAN); its schemes: {', '.join(schemes)}"
    best = min(_write_priority(p) for p in writable)
    for p in (p for p in writable if _write_priority(p) == best):
        prefix = re.sub("/+", "/", f"/{p.get('prefix') or ''}/")
        if p.get("hostname") not in (host, "localhost"):
            return f"its {url.scheme} protocol has hostname {p.get('hostname')!r}, the PFNs {host!r}"
        if int(p.get("port") or 0) != port:
            return f"its {url.scheme} protocol has port {p.get('port')}, the PFNs {port}"
        if not path.startswith(prefix):
            return f"{path} is not under its {url.scheme} protocol's prefix {prefix}"
    return None


def _write_priority(protocol: dict[str, Any]) -> int:
    return int(((protocol.get("domains") or {}).get("wan") or {}).get("write") or 0)


def _scope(stream: Stream, scopes: frozenset[str], account: AccountInfo) -> list[Problem]:
    what = f"scope {stream.scope}"
    if stream.scope not in scopes:
        return [_problem("error", stream, what, "no such scope in Rucio", f"add it (rucio-admin scope add "
                         f"--account {account.name} --scope {stream.scope}) or correct scope")]
    if not account.admin and stream.scope not in account.scopes:
        return [_problem("warning", stream, what, f"account {account.name} neither owns it nor is admin: under the "
                         "generic policy it may not add datasets, attach files or set metadata there",
                         f"let the account own the scope, or {_admin(account)}")]
    return []


def _rule(stream: Stream, rule: Rule, rucio: RucioPreflight, account: AccountInfo, verb: Verb) -> list[Problem]:
    what = f"rule {rule.rse_expression!r} x{rule.copies}"
    try:
        rses = rucio.rses(rule.rse_expression)
    except Permanent as exc:
        rses, refused = frozenset(), f": {exc}"
    else:
        refused = ""
    if not rses:
        return [_problem("error", stream, what, f"the RSE expression matches no RSE{refused}",
                         "correct rse_expression (rucio list-rses --rses EXPRESSION)")]
    if rses == {stream.source_rse}:
        return [_problem("error", stream, what, "the RSE expression matches only the source RSE: nothing would "
                         "ever be archived", "name the archive RSE(s)")]
    out = []
    if stream.source_rse in rses:
        out.append(_problem("warning", stream, what, "the RSE expression includes the source RSE: the judge may "
                            "count the source replica as a copy", "exclude it (EXPRESSION\\SOURCE)"))
    if len(rses) < rule.copies:
        out.append(_problem("error", stream, what, f"it matches {len(rses)} RSE(s), fewer than the copies: Rucio "
                            "refuses the rule (InsufficientTargetRSEs)", "lower copies or widen the expression"))
    elif verb != "cleanup" and not account.admin:
        quota = sorted(r for r in rses if account.limits.get(r, 0) - account.usage.get(r, 0) > 0)
        if len(quota) < rule.copies:
            out.append(_problem("error", stream, what, f"account {account.name} has local quota left on "
                                f"{len(quota)} of {sorted(rses)}, fewer than the copies: Rucio refuses the rule "
                                "(InsufficientAccountLimit)", f"set an account limit (rucio-admin account "
                                f"set-limits {account.name} RSE BYTES), or {_admin(account)}"))
    return out
