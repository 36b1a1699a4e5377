"""The error tree: the class, never the message, decides whether to retry."""

from __future__ import annotations


class SyncdError(Exception):
    """Base of every error syncd raises on purpose."""


class ConfigError(SyncdError):
    """The configuration is invalid; `problems` holds one line per bad field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Transient(SyncdError):
    """Worth retrying after a pause: the same request may succeed later."""


class Terminal(SyncdError):
    """Retrying the same request cannot help (bad credentials, bad request)."""


class VendorError(SyncdError):
    """A vendor answered with an error; carries the status and a short, secret-free body excerpt."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "", url: str = "") -> None:
        super().__init__(message)
        self.status, self.body, self.url = status, body[:300], url


class RateLimited(VendorError, Transient):
    """429 (or the vendor's equivalent); `retry_after` in seconds when the vendor said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class VendorUnavailable(VendorError, Transient):
    """5xx, gateway errors."""


class VendorTimeout(VendorError, Transient, TimeoutError):
    """The request took longer than the source's timeout."""


class VendorConnectionError(VendorError, Transient, ConnectionError):
    """DNS, refused or reset connections."""


class MalformedResponse(VendorError, Transient):
    """A body that does not parse (truncated, HTML from a proxy): retried, then the run fails."""


class VendorAuthError(VendorError, Terminal):
    """The credential was refused (401, or 403 where the vendor means auth)."""


class RequestRejected(VendorError, Terminal):
    """Any other 4xx: the request itself is wrong."""


class SinkError(Transient):
    """A sink could not take a batch; the batch stays in the spool."""


class RowsRefused(SyncdError):
    """A sink refuses the data of a batch (some row can never be written there): the drainer splits the
    batch until it finds the refused rows, dead-letters each, and delivers the rest."""


class SchemaMismatch(SyncdError):
    """The sink's table or column is not what syncd wrote it for: only that sink stops, loudly, until fixed."""

    def __init__(self, message: str, *, table: str = "", column: str = "") -> None:
        super().__init__(message)
        self.table, self.column = table, column
