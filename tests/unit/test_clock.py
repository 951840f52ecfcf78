from datetime import UTC, datetime, timedelta

import pytest

from injector import clock

INSTANT = datetime(2026, 11, 25, 1, 2, 3, 456789, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2026-11-25 01:02:03.456789", "2026-11-25T01:02:03.456789Z",
                                  "2026-11-25T03:02:03.456789+02:00", "2026-11-24T23:02:03.456789-02:00"])
def test_naive_is_utc_and_offsets_are_honoured(text):
    assert clock.parse(text, "t") == INSTANT


def test_rfc_1123_text_as_rucio_returns_it_is_read():
    assert clock.parse("Wed, 25 Nov 2026 01:02:03 UTC", "t") == INSTANT.replace(microsecond=0)


def test_bad_text_is_an_error_naming_what_was_read():
    with pytest.raises(clock.BadTime, match="lst:/a hermes created_at: 'yesterday' is not a time"):
        clock.parse("yesterday", "lst:/a hermes created_at")


def test_a_time_ahead_beyond_the_skew_is_clamped_to_the_receive_time_and_counted():
    before = clock.clamped()
    assert clock.received(INSTANT + clock.SKEW + timedelta(seconds=1), "t", now=INSTANT) == INSTANT
    assert clock.received(INSTANT + clock.SKEW, "t", now=INSTANT) == INSTANT + clock.SKEW  # within the skew: kept
    assert clock.clamped() == before + 1
