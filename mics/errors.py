"""One root for every error mics raises on purpose: `except mics.MicsError` catches them all.

    MicsError
    ├── ConfigError      bad configuration, found before any model call (also a ValueError)
    ├── DataError        a dataset or question record cannot be used (also a ValueError)
    ├── StoreError       the run store cannot be opened, read or written
    ├── RunError         a run cannot start, resume or go on (also a RuntimeError)
    ├── Stopped          the run's owner asked it to stop
    └── BackendError     a model call failed; `status` and `retry_after` travel with it
        ├── TransientError   429, 5xx, timeouts, dropped connections: retried with backoff
        │   └── OutOfMemoryError  the accelerator ran out of memory: retried (smaller batch)
        └── PermanentError   bad request, unknown model: fails fast, never retried
            └── FatalError   no call to this endpoint can succeed (bad key): the run stops

The older classes (`mics.config.ConfigError`, `store.StoreError`, `backends.base.BackendError`
and its kinds, `backends.gate.StopRequested` and `RunAborted`, `mics.run.RunError`) subclass
these, so code that catches either keeps working.
"""

from __future__ import annotations

from typing import Literal

BackendKind = Literal["transient", "oom", "permanent", "fatal"]


class MicsError(Exception):
    """The root of every error mics raises on purpose."""


class ConfigError(MicsError, ValueError):
    """A configuration problem, reported before any model call; the message names the key."""


class DataError(MicsError, ValueError):
    """A dataset or record that cannot be used; the message names the record and field."""


class StoreError(MicsError):
    """Any problem with a run store, with a one-line message meant for the user."""


class RunError(MicsError, RuntimeError):
    """A run cannot start, resume or go on; the message says why and what to do.

    When a backend error stopped the run, its `status` and `retry_after` are kept here.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @classmethod
    def from_error(cls, error: BaseException, message: str | None = None) -> RunError:
        """A RunError for `error`, keeping its `status` and `retry_after` when it has them."""
        return cls(message if message is not None else str(error),
                   status=getattr(error, "status", None),
                   retry_after=getattr(error, "retry_after", None))


class Stopped(MicsError):
    """The run's owner asked it to stop: no new calls are sent; finished work is stored."""


class BackendError(MicsError):
    """A model call failed. `retryable` says whether trying again may help; `kind` which
    of the four kinds it is. `status` (HTTP) and `retry_after` (seconds) survive `again`."""

    retryable: bool = True
    kind: BackendKind = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status

    def again(self, message: str) -> BackendError:
        """The same kind of error with a new message, keeping `status` and `retry_after`
        (for re-raising with more context: ``raise e.again(f"{name}: {e}") from e``)."""
        return type(self)(message, retry_after=self.retry_after, status=self.status)


class TransientError(BackendError):
    """Rate limits, 5xx, timeouts, dropped connections: retried with backoff."""

    retryable = True
    kind: BackendKind = "transient"


class OutOfMemoryError(TransientError):
    """The accelerator ran out of memory; retried, as the next batch may be smaller."""

    kind: BackendKind = "oom"


class PermanentError(BackendError):
    """Bad request, auth, unknown model: fails fast, never retried."""

    retryable = False
    kind: BackendKind = "permanent"


class FatalError(PermanentError):
    """The endpoint cannot serve any call (bad key, no such model): the run stops."""

    kind: BackendKind = "fatal"


__all__ = [
    "BackendError", "BackendKind", "ConfigError", "DataError", "FatalError", "MicsError",
    "OutOfMemoryError", "PermanentError", "RunError", "StoreError", "Stopped", "TransientError",
]
