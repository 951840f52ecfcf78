from datetime import UTC, datetime, timedelta

from consumers.reconcile import dataset_pattern, diagnose_rule, stream_pattern
from injector.config import parse

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def stream(**over):
    s = {"name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": "ORM-BUFFER",
         "storage_root": "/fefs/lst1/", "scope": "lst", "dataset": "LST1_{night}_{datatype}_raw",
         "rules": [{"rse_expression": "PIC-ARCHIVE"}], **over}
    return parse({"streams": [s]}).streams[0]


def rule(**over):
    return {"id": "r1", "state": "OK", "rse_expression": "PIC-ARCHIVE", "copies": 1, "expires_at": None,
            "locked": False, "child_rule_id": None, "error": None, **over}


def test_patterns_cover_the_stream():
    assert stream_pattern(stream()) == "/fefs/lst1/*"
    assert stream_pattern(stream(did_name="relative", did_prefix="lst1/")) == "lst1/*"
    assert dataset_pattern(stream()) == "LST1_*_*_raw"


def test_healthy_rule_is_not_a_finding():
    assert diagnose_rule("s", "lst:ds", rule(), NOW) is None
    assert diagnose_rule("s", "lst:ds", rule(expires_at=NOW + timedelta(hours=1)), NOW) is None


def test_expired_locked_rule_names_the_lock_and_the_negative_lifetime():
    f = diagnose_rule("s", "lst:ds", rule(expires_at=NOW - timedelta(minutes=5), locked=True), NOW)
    assert f is not None and f.kind == "rule-expired"
    assert "remaining lifetime -0h05m00s" in f.detail and "locked" in f.detail


def test_expired_rule_waiting_for_a_child_and_soft_deleted_rule():
    child = diagnose_rule("s", "lst:ds", rule(expires_at=NOW - timedelta(hours=2), child_rule_id="c9"), NOW)
    assert child is not None and "child rule c9" in child.detail
    plain = diagnose_rule("s", "lst:ds", rule(expires_at=(NOW - timedelta(seconds=30)).strftime(
        "%a, %d %b %Y %H:%M:%S UTC")), NOW)
    assert plain is not None and "judge-cleaner" in plain.detail


def test_stuck_rule_says_why_and_what_fix_does():
    f = diagnose_rule("s", "lst:ds", rule(state="STUCK", error="SOURCE_NOT_FOUND", locks_stuck_cnt=3), NOW)
    assert f is not None and f.kind == "rule-stuck" and "SOURCE_NOT_FOUND" in f.detail and "boost" in f.fix
