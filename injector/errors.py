"""The error tree that decides every outcome.

Permanent errors go straight to the dead-letter queue with their machine-readable `reason`;
transient errors are retried (with backoff at the edge, then by redelivery). Nothing else
decides; `injector.settle` maps these to ack / requeue / dead-letter.
"""

from __future__ import annotations


class InjectorError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(InjectorError):
    """The configuration cannot be used; raised once, at start-up."""


class Permanent(InjectorError):
    """Retrying cannot help: dead-letter now. `reason` is a stable machine-readable code."""

    reason = "permanent"

    def __init__(self, message: str, *, event_id: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id
        if reason is not None:
            self.reason = reason


class InvalidEvent(Permanent):
    reason = "invalid-event"


class NoStream(Permanent):
    reason = "no-stream"


class PathOutsideRoot(Permanent):
    reason = "path-outside-root"


class PathNotCanonical(Permanent):
    """The announced path reaches its file through a symlink: the file has another (canonical) name."""

    reason = "path-not-canonical"


class TemplateFieldMissing(Permanent):
    reason = "template-field-missing"


class ChecksumConflict(Permanent):
    reason = "checksum-conflict"


class RucioRefused(Permanent):
    """Rucio refused the request for good (bad name, unknown RSE or scope, closed dataset...)."""

    reason = "rucio-refused"


class PermissionDenied(Permanent):
    reason = "permission-denied"


class DatasetClosed(Permanent):
    """The file's dataset is closed (ops closed it): it cannot be attached, so it is not registered either."""

    reason = "dataset-closed"


class Transient(InjectorError):
    """A passing fault (Rucio 5xx, connection loss, timeout): retry later."""

    reason = "transient"


class RucioUnavailable(Transient):
    """A call failed in a way a retry may cure, while Rucio as a whole answers (its health probe passes):
    e.g. a concurrent insert, or an error only this request meets. Redelivered within the delivery budget;
    when it persists, dead-lettered `rucio-unavailable` with the server's message."""

    reason = "rucio-unavailable"


class RucioFailed(RucioUnavailable):
    """The server answered a bulk call with an error (or it timed out) while Rucio as a whole is healthy:
    the batch's problem. `isolate` splits the batch down to the item that fails, so one bad item never
    holds back its neighbours; that item is then retried like any RucioUnavailable."""


class RucioDown(Transient):
    """Rucio as a whole does not answer (its health probe fails): an outage, never the event's fault.
    The consumer holds its messages unacked and waits (injector.breaker); no delivery budget is spent."""

    reason = "rucio-down"


class BrokerUnavailable(Transient):
    reason = "broker-unavailable"


class PublishFailed(InjectorError):
    """The broker did not take a message: nacked, unroutable, or the connection died first."""
