"""Properties of the decoders and of what ingest would hand to Rucio, on generated hostile input (hypothesis).

The decoders' contract: any bytes at all decode to an event or raise InvalidEvent naming why, nothing else. An event
that decodes is either placed (a DID name Rucio accepts, a PFN that is the stream's prefix + a normalised path
strictly below its root, a size that fits Rucio's BIGINT) or refused with a Permanent error carrying a reason code.
The hostile catalogue is tests/hostile.py; the run of these bodies through the real consumers is
tests/integration/test_fuzz_consumers.py.
"""

from __future__ import annotations

import os
import posixpath
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.cleanup import OTHER_RUCIO_EVENTS, cleanup
from injector.config import parse
from injector.errors import InvalidEvent, Permanent
from injector.events import FileClosed, decode_file_closed, decode_rucio_event, encode
from injector.streams import DID_NAME, place
from injector.testing import FakeRucio
from tests.hostile import BIG, MUTATIONS, file_closed_case, hermes_case

ROOT = "/data/lst1"
SETTINGS = parse({"streams": [{
    "name": "lst1-raw", "site": "ORM", "instrument": "LST1", "source_rse": "ORM-BUFFER", "storage_root": ROOT,
    "scope": "lst", "dataset": "LST1_{night}_raw", "rules": [{"rse_expression": "PIC-ARCHIVE"}]}]})
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)


def decoded_or_refused(body: bytes) -> FileClosed | None:
    try:
        return decode_file_closed(body)
    except InvalidEvent as exc:
        assert exc.reason == "invalid-event" and str(exc)
        return None


def check_placed(event: FileClosed) -> None:
    """What ingest would register, or the Permanent refusal: never a DID or PFN the contract forbids."""
    assert 0 <= event.size < BIG and len(event.adler32) == 8 and event.path.startswith("/")
    assert decode_file_closed(encode(event)) == event, "encode/decode round trip"
    try:
        p = place(SETTINGS.streams, event)
    except Permanent as exc:
        assert exc.reason != "permanent", f"a refusal without a reason code: {exc}"
        return
    assert DID_NAME.fullmatch(p.name) and DID_NAME.fullmatch(p.dataset)
    path = p.pfn.removeprefix("file://localhost")
    assert p.pfn.startswith("file://localhost/") and posixpath.normpath(path) == path
    assert path.startswith(ROOT + "/"), f"{path!r} is not strictly below the root"


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes_decode_to_a_file_closed_event_or_invalid_event(body: bytes) -> None:
    event = decoded_or_refused(body)
    if event is not None:
        check_placed(event)


@FUZZ
@given(json_values)
def test_any_json_value_decodes_to_a_file_closed_event_or_invalid_event(value: Any) -> None:
    import json

    decoded_or_refused(json.dumps(value).encode())


@FUZZ
@given(st.sampled_from(sorted(MUTATIONS)), st.randoms(use_true_random=False))
def test_hostile_file_closed_bodies_are_decoded_as_the_contract_says_and_placed_only_below_the_root(
        kind: str, rng: random.Random) -> None:
    case = file_closed_case(rng, ROOT, kind)
    event = decoded_or_refused(case.body)
    if case.valid is not None:
        assert (event is not None) is case.valid, f"{kind}: {case.body[:200]!r}"
    if event is not None:
        check_placed(event)


@FUZZ
@given(st.one_of(st.binary(max_size=1024), st.builds(lambda r: hermes_case(r).body,
                                                      st.randoms(use_true_random=False))))
def test_hermes_bodies_decode_or_are_refused_and_cleanup_settles_every_one_with_a_bounded_label(body: bytes) -> None:
    try:
        events: list[Any] = [decode_rucio_event(body)]
    except InvalidEvent as exc:
        events = [exc]
    (outcome,) = cleanup(events, FakeRucio(), SETTINGS)
    assert outcome.kind in ("done", "dead-letter"), outcome
    if outcome.label.startswith("ignored-"):
        assert outcome.label == "ignored-other" or outcome.label.removeprefix("ignored-") in OTHER_RUCIO_EVENTS
