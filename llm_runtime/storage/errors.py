"""What went wrong with an object, and whether another try can help: pure, with table tests.

Every failure the store raises is a :class:`StorageError` (an ``OSError``) whose message names the
object and the attempts made. :func:`kind_of` sorts the underlying botocore / socket error into

- ``transient``: throttling (503 SlowDown), server errors (500), resets, cut bodies and timeouts;
  retried (botocore for requests, :mod:`.retry` for bodies) until the attempts run out;
- ``missing``: the key does not exist (NoSuchKey, 404);
- ``changed``: the object was replaced while it was read (its ETag no longer matches);
- ``permanent``: nothing another try fixes (no such bucket, no credentials, access denied).

Only the caller knows whether a missing or changed object means corruption (a checkpoint's
manifest names an object that is not there) or plain absence (no manifest yet).
"""
from __future__ import annotations

__all__ = ["ObjectChanged", "ObjectMissing", "StorageError", "describe", "error_code", "kind_of", "wrap"]

TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "BandwidthLimitExceeded", "500", "502", "503", "504"})
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
CHANGED_CODES = frozenset({"PreconditionFailed", "412"})
# botocore / urllib3 / socket errors by class name: a broken connection, a body that ended early, a
# timeout. Names rather than classes keep this module free of botocore imports (and testable alone).
TRANSIENT_TYPES = frozenset({
    "ResponseStreamingError", "IncompleteReadError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionClosedError", "EndpointConnectionError", "ConnectionError", "HTTPClientError", "ProtocolError",
    "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "TimeoutError", "IncompleteRead",
    "ShortBody"})


class StorageError(OSError):
    """An object that could not be read, written, listed or deleted; the message names it."""

    kind = "permanent"


class ObjectMissing(StorageError):
    """The key does not exist."""

    kind = "missing"


class ObjectChanged(StorageError):
    """The object was replaced while it was being read."""

    kind = "changed"


class ShortBody(EOFError):
    """A response body that ended before the bytes asked for (a cut connection)."""


def error_code(err: BaseException | None) -> str | None:
    """The S3 error code of a botocore ClientError (``response`` may be None or absent on other errors)."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error")
    code = error.get("Code") if isinstance(error, dict) else None
    return str(code) if code else None


def kind_of(err: BaseException | None) -> str:
    """``transient``, ``missing``, ``changed`` or ``permanent`` (see the module docstring)."""
    if isinstance(err, StorageError):
        return err.kind
    code = error_code(err)
    if code is not None:
        if code in MISSING_CODES:
            return "missing"
        if code in CHANGED_CODES:
            return "changed"
        return "transient" if code in TRANSIENT_CODES else "permanent"
    names = {cls.__name__ for cls in type(err).__mro__}
    return "transient" if names & TRANSIENT_TYPES else "permanent"


def describe(err: BaseException | None) -> str:
    """An error without anything secret in it: the S3 error code and message, or the exception class."""
    if err is None:
        return "unknown error"
    code = error_code(err)
    if code is not None:
        message = (getattr(err, "response", None) or {}).get("Error", {}).get("Message", "")
        return f"{code} ({message})" if message else code
    if isinstance(err, StorageError):
        return str(err)
    return type(err).__name__


def wrap(err: BaseException, what: str, where: str, attempts: int = 1) -> StorageError:
    """The StorageError to raise for ``err`` while doing ``what`` to ``where`` (a URI)."""
    kind = kind_of(err)
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if kind == "transient" else ""
    message = f"{what} {where} failed{tries}: {describe(err)}"
    if kind == "missing":
        return ObjectMissing(f"{where} does not exist")
    if kind == "changed":
        return ObjectChanged(f"{where} changed while it was being read ({describe(err)})")
    error = StorageError(message)
    error.kind = kind
    return error
