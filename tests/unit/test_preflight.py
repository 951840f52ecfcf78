"""The start-up checks on the in-memory Rucio (the claims on the real server: tests/integration/test_preflight.py)."""

import logging
import threading

import pytest

from consumers.services import checked
from injector.config import parse
from injector.errors import ConfigError, RucioRefused, RucioUnavailable
from injector.gateway import AccountInfo
from injector.preflight import Problem, check, enforce, pfn_refused
from injector.testing import FakeRucio, Unavailable
from tests.conftest import STREAMS

SRC = "ORM-BUFFER"


@pytest.fixture
def rucio():
    return FakeRucio(rses={SRC: "file://localhost/data/"})


def lines(problems: list[Problem]) -> list[tuple[str, str]]:
    return [(p.severity, p.stream) for p in problems]


def one(problems: list[Problem], stream: str = "lst1-raw") -> Problem:
    (p,) = [p for p in problems if p.stream == stream]
    return p


def user(**over) -> AccountInfo:
    base = {"name": "daq", "admin": False, "scopes": frozenset({"lst", "magic"}),
            "limits": {"PIC-ARCHIVE": float("inf")}, "usage": {}}
    return AccountInfo(**{**base, **over})


def test_streams_rucio_accepts_have_no_problem(settings, rucio):
    assert check(settings, rucio) == []


def test_an_unknown_source_rse_is_an_error_naming_stream_rse_and_fix(settings, rucio):
    s = parse({"streams": [dict(STREAMS["streams"][0], source_rse="ORM-NOPE")]})
    p = one(check(s, rucio))
    assert p.severity == "error" and "source_rse ORM-NOPE: no such RSE" in p.message and "Fix: add it" in p.message
    assert p.line().startswith("ERROR   lst1-raw: source_rse ORM-NOPE")


@pytest.mark.parametrize(("setting", "words"), [
    ({"deterministic": True}, "is deterministic"),
    ({"attributes": {"tombstone_delay": "3600"}}, "tombstone_delay=3600"),
    ({"attributes": {"tombstone_delay": -1}}, "tombstone_delay=-1"),
    ({"volatile": True}, "is volatile"),
])
def test_a_source_rse_ingest_cannot_use_safely_is_an_error(settings, rucio, setting, words):
    rucio.rse_settings[SRC] = setting
    problems = check(settings, rucio)
    assert lines(problems) == [("error", "lst1-raw"), ("error", "magic-raw")]
    assert all(words in p.message for p in problems)


def test_tombstone_delay_zero_gives_no_tombstone_and_is_fine(settings, rucio):
    rucio.rse_settings[SRC] = {"attributes": {"tombstone_delay": "0"}}
    assert check(settings, rucio) == []


@pytest.mark.parametrize(("prefix", "pfn_prefix", "words"), [
    ("file://localhost/other/", "file://localhost", "/data/lst1/ is not under its file protocol's prefix /other/"),
    ("root://buffer.orm:1094/data/", "file://localhost", "no protocol of scheme 'file' that writes"),
    ("root://buffer.orm:1094/data/", "root://buffer.orm:1095/", "has port 1094, the PFNs 1095"),
    ("root://buffer.orm:1094/data/", "root://other.orm:1094/", "hostname 'buffer.orm', the PFNs 'other.orm'"),
])
def test_pfns_outside_the_source_protocol_are_an_error(prefix, pfn_prefix, words):
    rucio = FakeRucio(rses={SRC: prefix})
    s = parse({"streams": [dict(STREAMS["streams"][0], pfn_prefix=pfn_prefix)]})
    p = one(check(s, rucio))
    assert p.severity == "error" and words in p.message, p.message


def test_pfns_rucio_accepts_pass_like_rucio_parses_them():
    s = parse({"streams": [dict(STREAMS["streams"][0], pfn_prefix="root://buffer.orm:1094/")]}).streams[0]
    wan = {"wan": {"write": 1}}
    assert pfn_refused(s, [{"scheme": "root", "hostname": "buffer.orm", "port": 1094, "prefix": "//data",
                            "domains": wan}]) is None
    assert pfn_refused(s, [{"scheme": "root", "hostname": "localhost", "port": 1094, "prefix": "/",
                            "domains": wan}]) is None, "Rucio accepts any host name under a localhost protocol"
    worse = {"scheme": "root", "hostname": "buffer.orm", "port": 1094, "prefix": "/data", "domains": {"wan": {
        "write": 2}}}
    best = {**worse, "prefix": "/elsewhere", "domains": wan}
    assert "prefix /elsewhere/" in (pfn_refused(s, [worse, best]) or ""), "the best write priority decides"


def test_an_unknown_scope_and_an_expression_matching_nothing_or_only_the_source_are_errors(settings, rucio):
    rucio.scopes.discard("magic")
    rucio.expressions["PIC-ARCHIVE"] = set()
    problems = check(settings, rucio)
    assert lines(problems) == [("error", "lst1-raw"), ("error", "magic-raw"), ("error", "magic-raw")]
    assert "scope magic: no such scope" in problems[1].message
    assert all("matches no RSE" in p.message for p in (problems[0], problems[2]))
    rucio.expressions["PIC-ARCHIVE"] = {SRC}
    assert "matches only the source RSE" in check(settings, rucio)[0].message


def test_an_expression_rucio_refuses_is_an_error_with_rucios_words(settings, rucio):
    rucio.fail("rses", RucioRefused("InvalidRSEExpression: Problem with parentheses."), times=2)
    problems = check(settings, rucio)
    assert [p.severity for p in problems] == ["error"] * 2 and "Problem with parentheses" in problems[0].message


def test_too_few_rses_for_the_copies_is_an_error_and_the_source_among_them_a_warning(rucio):
    two = {"streams": [dict(STREAMS["streams"][0], rules=[{"rse_expression": "T1S", "copies": 3}])]}
    rucio.expressions["T1S"] = {"CNAF", SRC}
    assert [(p.severity, p.message.split(":")[1].strip()) for p in check(parse(two), rucio)] == [
        ("warning", "the RSE expression includes the source RSE"), ("error", "it matches 2 RSE(s), fewer than the "
                                                                                "copies")]


def test_an_account_that_is_not_admin_gets_warnings_where_the_policy_decides(settings, rucio):
    rucio.account = user(scopes=frozenset({"lst"}))
    problems = check(settings, rucio)
    assert {p.severity for p in problems} == {"warning"}
    text = " | ".join(p.line() for p in problems)
    assert "only root or admin may add replicas" in text and "neither owns it nor is admin" in text
    assert "set the tombstone" in text, "cleanup's release needs admin under the generic policy"
    assert not [p for p in check(settings, rucio, "ingest") if "tombstone" in p.message]
    assert [p for p in check(settings, rucio, "cleanup") if "add replicas" in p.message] == []


def test_an_account_without_quota_on_the_archive_is_an_error_for_ingest_only(settings, rucio):
    rucio.account = user(limits={"PIC-ARCHIVE": 100}, usage={"PIC-ARCHIVE": 100})
    errors = [p for p in check(settings, rucio, "ingest") if p.severity == "error"]
    assert len(errors) == 2 and all("InsufficientAccountLimit" in p.message for p in errors)
    assert not [p for p in check(settings, rucio, "cleanup") if p.severity == "error"]
    rucio.account = user(admin=True, limits={})
    assert check(settings, rucio) == [], "Rucio checks no quota for an admin account"


def test_a_rucio_outage_is_not_a_config_problem_it_raises_the_transient_error(settings, rucio):
    rucio.fail("account_info", Unavailable("connection refused"))
    with pytest.raises(RucioUnavailable):
        check(settings, rucio)
    rucio.fail("find_rse", Unavailable("503"))
    with pytest.raises(RucioUnavailable):
        check(settings, rucio)


def test_enforce_refuses_to_start_naming_each_error_and_only_logs_warnings(caplog):
    problems = [Problem("error", "a", "one: x. Fix: y"), Problem("warning", "b", "two"),
                Problem("error", "c", "three")]
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError) as refused:
        enforce(problems, "ingest")
    assert str(refused.value).splitlines()[1:] == ["  ERROR   a: one: x. Fix: y", "  ERROR   c: three"]
    assert "WARNING b: two" in caplog.text
    enforce(problems[1:2], "ingest")  # warnings only: starts


def test_start_up_waits_out_a_rucio_outage_then_checks(settings, rucio):
    rucio.fail("account_info", Unavailable("connection refused"), times=2)
    assert checked(settings, "ingest", threading.Event(), rucio, pause=0.01)
    assert rucio.calls["account_info"] == 3


def test_start_up_stops_waiting_when_asked_to_stop_and_refuses_a_bad_stream(settings, rucio):
    stop = threading.Event()
    rucio.fail("account_info", Unavailable("connection refused"), times=1000)
    threading.Timer(0.1, stop.set).start()
    assert not checked(settings, "ingest", stop, rucio, pause=0.01)
    rucio = FakeRucio(rses={})
    with pytest.raises(ConfigError, match="source_rse ORM-BUFFER: no such RSE"):
        checked(settings, "cleanup", threading.Event(), rucio)


def test_a_read_rucio_refuses_leaves_the_stream_unchecked_with_a_warning_not_a_crash(settings, rucio):
    rucio.fail("find_rse", RucioRefused("AccessDenied: no"))
    problems = check(settings, rucio)
    assert [(p.severity, p.stream) for p in problems] == [("warning", "lst1-raw")]
    assert "not fully checked" in problems[0].message and "AccessDenied" in problems[0].message


def test_start_up_during_a_rucio_outage_waits_on_the_breaker_until_rucio_answers(settings, rucio):
    rucio.down = True
    threading.Timer(0.2, lambda: setattr(rucio, "down", False)).start()
    assert checked(settings, "ingest", threading.Event(), rucio, pause=60)  # the breaker's probes, not the pause
    assert rucio.breaker.outages == 1 and not rucio.breaker.open
