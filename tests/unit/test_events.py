import json
import uuid

import pytest

from injector.errors import InvalidEvent
from injector.events import FileClosed, decode_file_closed, encode, json_schemas


def event(**over):
    fields = dict(site="ORM", instrument="LST1", path="/data/lst1/a.fits.fz", size=10, adler32="0a1b2c3d",
                  night="20261124", run=42)
    fields.update(over)
    return FileClosed.create(**fields)


def body(**over):
    data = json.loads(encode(event()))
    data.update(over)
    return json.dumps(data).encode()


def test_encoded_event_decodes_to_the_same_event():
    ev = event(metadata={"telescope": "LST-1", "zenith": 23.5})
    assert decode_file_closed(encode(ev)) == ev


def test_encoding_is_canonical_with_utc_z_times():
    data = json.loads(encode(event()))
    assert data["schema"] == "file-closed/1"
    assert data["occurred_at"].endswith("Z")
    assert list(data) == sorted(data)


def test_unknown_field_is_rejected_naming_the_field():
    with pytest.raises(InvalidEvent, match="colour: Extra inputs are not permitted"):
        decode_file_closed(body(colour="red"))


def test_size_as_string_is_rejected_because_the_contract_is_strict():
    with pytest.raises(InvalidEvent, match="size"):
        decode_file_closed(body(size="10"))


def test_bad_adler32_names_the_field_and_the_value():
    with pytest.raises(InvalidEvent, match=r"adler32: .*got 'xyz'"):
        decode_file_closed(body(adler32="xyz"))


def test_time_without_utc_zone_is_rejected():
    with pytest.raises(InvalidEvent, match="occurred_at"):
        decode_file_closed(body(occurred_at="2026-11-25T01:02:03+01:00"))


def test_missing_schema_is_rejected():
    data = json.loads(body())
    del data["schema"]
    with pytest.raises(InvalidEvent, match="schema: Field required"):
        decode_file_closed(json.dumps(data))


def test_invalid_event_error_carries_its_event_id():
    eid = str(uuid.uuid4())
    with pytest.raises(InvalidEvent) as info:
        decode_file_closed(body(event_id=eid, size=-1))
    assert info.value.event_id == eid


def test_not_json_at_all_is_an_invalid_event():
    with pytest.raises(InvalidEvent, match="Invalid JSON"):
        decode_file_closed(b"\x00garbage")


def test_routing_key_names_site_and_instrument():
    assert event().routing_key == "file.closed.ORM.LST1"


def test_site_with_a_dot_is_rejected_because_it_would_break_routing():
    with pytest.raises(Exception, match="site"):
        event(site="ORM.X")


def test_shipped_json_schemas_match_the_models(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "injector" / "schemas"
    for filename, schema in json_schemas().items():
        assert json.loads((shipped / filename).read_text()) == schema, (
            f"{filename} is stale: run python -m injector.events")


def test_occurred_at_ahead_of_this_hosts_clock_is_refused_naming_the_field():
    from datetime import UTC, datetime, timedelta

    future = (datetime.now(UTC) + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    with pytest.raises(InvalidEvent, match="occurred_at: Value error, is 1:59:.* ahead of this host's clock"):
        decode_file_closed(body(occurred_at=future))
