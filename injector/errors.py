"""The error tree that decides every outcome.

Permanent errors go straight to the dead-letter queue with their machine-readable `reason`;
transient errors are retried (with backoff at the edge, then by redelivery). Nothing else
decides; `injector.settle` maps these to ack / requeue / dead-letter. Each class names its reason
once, in its header (`class NoStream(Permanent, reason="no-stream")`).
"""

from __future__ import annotations

from typing import Any


class InjectorError(Exception):
    """Base of every error the project raises on purpose."""

    reason: str

    def __init_subclass__(cls, reason: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if reason is not None:
            cls.reason = reason


class ConfigError(InjectorError):
    """The configuration cannot be used; raised once, at start-up."""


class Permanent(InjectorError, reason="permanent"):
    """Retrying cannot help: dead-letter now. `reason` is a stable machine-readable code."""

    def __init__(self, message: str, *, event_id: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id
        if reason is not None:
            self.reason = reason


class InvalidEvent(Permanent, reason="invalid-event"):
    """The message is not a valid event of its contract: which field, and why, is in the text."""


class BadSignature(Permanent, reason="bad-signature"):
    """A file-closed event whose signature is missing (its stream requires one), names an unknown key or a key
    of another site, or does not match its body: forged or altered (`injector.signing`)."""


class NoStream(Permanent, reason="no-stream"):
    """No configured stream takes the event (its site, instrument and datatype)."""


class PathOutsideRoot(Permanent, reason="path-outside-root"):
    """The path (or the real path behind a symlink) leaves the stream's storage root."""


class PathNotCanonical(Permanent, reason="path-not-canonical"):
    """The announced path reaches its file through a symlink: the file has another (canonical) name."""


class TemplateFieldMissing(Permanent, reason="template-field-missing"):
    """The stream's dataset template needs a field the event does not carry."""


class ChecksumConflict(Permanent, reason="checksum-conflict"):
    """Rucio holds this name with another size or adler32: never overwritten."""


class RucioRefused(Permanent, reason="rucio-refused"):
    """Rucio refused the request for good (bad name, unknown RSE or scope, closed dataset...)."""


class ReplicaGone(RucioRefused, reason="replica-gone"):
    """The replica asked about is no longer in Rucio (deleted meanwhile): for a release, the goal already reached."""


class PermissionDenied(Permanent, reason="permission-denied"):
    """Rucio says the account may not do this: a person must grant it (or fix the stream)."""


class DatasetClosed(Permanent, reason="dataset-closed"):
    """The file's dataset is closed (ops closed it): it cannot be attached, so it is not registered either."""


class Transient(InjectorError, reason="transient"):
    """A passing fault (Rucio 5xx, connection loss, timeout): retry later."""


class RucioUnavailable(Transient, reason="rucio-unavailable"):
    """A call failed in a way a retry may cure, while Rucio as a whole answers (its health probe passes):
    e.g. a concurrent insert, or an error only this request meets. Redelivered within the delivery budget;
    when it persists, dead-lettered `rucio-unavailable` with the server's message."""


class RucioFailed(RucioUnavailable):
    """The server answered a bulk call with an error (or it timed out) while Rucio as a whole is healthy:
    the batch's problem. `isolate` splits the batch down to the item that fails, so one bad item never
    holds back its neighbours; that item is then retried like any RucioUnavailable."""


class RucioDown(Transient, reason="rucio-down"):
    """Rucio as a whole does not answer (its health probe fails): an outage, never the event's fault.
    The consumer holds its messages unacked and waits (injector.breaker); no delivery budget is spent."""


class BrokerUnavailable(Transient, reason="broker-unavailable"):
    """No broker of the configuration answers, or the connection was lost: reconnect with backoff."""


class OutboxFull(Transient, reason="outbox-full"):
    """The DAQ outbox holds its `max_events` already (the broker has not confirmed them): the new events are
    refused, none of them written, none of the old ones dropped."""


class PublishFailed(InjectorError):
    """The broker did not take a message: nacked, unroutable, or the connection died first. `failed` names, by
    message id, the messages the broker answered for (nacked, unroutable) while it confirmed the others; empty when
    the fate of the whole batch is unknown (connection lost, confirms missing)."""

    def __init__(self, message: str, failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})
