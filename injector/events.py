"""The event contracts: file-closed/1 (DAQ → ingest) and file-archived/1 (cleanup → DAQ).

This is the one place where events are defined, encoded and decoded. Producers encode with
`encode`, consumers decode with `decode_file_closed`; the JSON Schema shipped for DAQ engineers
in other languages is generated from these models (`python -m injector.events --schema`).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from injector import clock
from injector.errors import InvalidEvent

FILE_CLOSED: Final = "file-closed/1"
FILE_ARCHIVED: Final = "file-archived/1"

# Site and instrument become routing-key words: no dots, no wildcards.
Word = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Adler32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}$")]
Md5 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Night = Annotated[str, StringConstraints(pattern=r"^[0-9]{8}$")]
MetaValue = str | int | float | bool
MAX_SIZE: Final = 2**63 - 1  # Rucio keeps bytes in a BIGINT: a larger size would fail inside Rucio, not here


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: uuid.UUID
    site: Word
    instrument: Word

    @field_validator("occurred_at", "archived_at", check_fields=False)
    @classmethod
    def _must_be_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() != UTC.utcoffset(None):
            raise ValueError("must be an RFC 3339 time in UTC (ending in Z or +00:00)")
        return value


class FileClosed(_Event):
    """A file the DAQ has finished writing and wants archived. A site may require it signed: headers
    injector-key-id (the key's id) and injector-signature (hex HMAC-SHA256 of the exact body bytes sent)."""

    schema_: Literal["file-closed/1"] = Field(alias="schema")
    occurred_at: datetime
    path: Annotated[str, StringConstraints(pattern=r"^/", max_length=4096)]
    size: Annotated[int, Field(ge=0, le=MAX_SIZE)]
    adler32: Adler32
    md5: Md5 | None = None
    run: Annotated[int, Field(ge=0)] | None = None
    night: Night | None = None
    datatype: Word | None = None
    metadata: dict[str, MetaValue] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _not_in_the_future(cls, value: datetime) -> datetime:
        # occurred_at picks the file's dataset ({date}): a DAQ clock running ahead would file it under a wrong
        # date, so such an event is refused (dead-lettered, replayable once the clock is fixed), never guessed.
        lead = clock.ahead(value)
        if lead is not None:
            raise ValueError(f"is {lead} ahead of this host's clock (more than {clock.SKEW} allowed): "
                             "the DAQ's clock is wrong")
        return value

    @property
    def routing_key(self) -> str:
        return f"file.closed.{self.site}.{self.instrument}"

    @classmethod
    def create(cls, **fields: Any) -> FileClosed:
        """A new event: schema, event_id and occurred_at (now) are filled in unless given."""
        fields.setdefault("event_id", new_event_id())
        fields.setdefault("occurred_at", utcnow())
        return cls(schema=FILE_CLOSED, **fields)


class FileArchived(_Event):
    """A file whose archive copies are verified and whose source copy is gone."""

    schema_: Literal["file-archived/1"] = Field(alias="schema")
    path: str
    size: int
    adler32: Adler32
    scope: str
    name: str
    destinations: list[str]
    archived_at: datetime

    @property
    def routing_key(self) -> str:
        return f"file.archived.{self.site}.{self.instrument}"

    @classmethod
    def create(cls, **fields: Any) -> FileArchived:
        """The announcement for a file: its event_id is derived from scope:name."""
        fields.setdefault("event_id", archived_event_id(fields["scope"], fields["name"]))
        return cls(schema=FILE_ARCHIVED, **fields)


E = TypeVar("E", bound=BaseModel)


class RucioEvent(BaseModel):
    """A message from Rucio's hermes: Rucio owns its payload, so only the envelope is checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: str
    payload: dict[str, Any]
    created_at: str | None = None

    def get(self, key: str) -> Any:
        return self.payload.get(key)


# file-archived event ids are derived from the file, so every announcement of one file is the
# same event: a DAQ deduplicating on event_id sees each file archived exactly once.
ARCHIVED_NAMESPACE = uuid.UUID("9b0e1c38-5a53-4f7e-9d5e-5c1b0a7f2f11")


def archived_event_id(scope: str, name: str) -> uuid.UUID:
    return uuid.uuid5(ARCHIVED_NAMESPACE, f"{scope}:{name}")


def new_event_id() -> uuid.UUID:
    return uuid.uuid4()


def utcnow() -> datetime:
    return datetime.now(UTC)


def encode(event: FileClosed | FileArchived) -> bytes:
    """Canonical JSON body of an event (sorted keys, no spaces, Z times)."""
    data = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not data.get("metadata", True):
        del data["metadata"]
    for key in ("occurred_at", "archived_at"):
        if key in data:
            data[key] = data[key].replace("+00:00", "Z")
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode_file_closed(body: bytes | str) -> FileClosed:
    """Decode and validate a file-closed/1 body; InvalidEvent names every bad field."""
    return _decode(FileClosed, body)


def decode_file_archived(body: bytes | str) -> FileArchived:
    return _decode(FileArchived, body)


def decode_rucio_event(body: bytes | str) -> RucioEvent:
    return _decode(RucioEvent, body)


def _decode(model: type[E], body: bytes | str) -> E:
    try:
        return model.model_validate_json(body, by_alias=True)
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc), event_id=_peek_event_id(body)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad field: `field: why (got value)`."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        got = "" if err["type"] == "missing" else f" (got {_short(err.get('input'))})"
        parts.append(f"{where}: {err['msg']}{got}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _peek_event_id(body: bytes | str) -> str | None:
    """The event_id of an invalid body, when there is one, so the error can name the event."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's parser goes
        return None
    value = data.get("event_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def json_schemas() -> dict[str, dict[str, Any]]:
    return {
        "file-closed-1.schema.json": FileClosed.model_json_schema(by_alias=True, mode="validation"),
        "file-archived-1.schema.json": FileArchived.model_json_schema(by_alias=True, mode="validation"),
    }


if __name__ == "__main__":  # pragma: no cover - regenerates the shipped schemas
    import pathlib
    import sys

    if len(sys.argv) > 2 or sys.argv[1:2] and sys.argv[1].startswith("-"):
        sys.exit("usage: python -m injector.events [DIRECTORY]  (default: the package's schemas/)")
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "schemas")
    out.mkdir(parents=True, exist_ok=True)
    for filename, schema in json_schemas().items():
        (out / filename).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
