"""Errors the tool reports to the user (one clear line, non-zero exit), and the exit codes.

Exit codes (README, "Exit codes"): 0 success; 1 the job failed while running (the destination
is left incomplete, re-running resumes); 2 refused before anything was written (bad input,
flags, manifest, unreadable source, no credentials); 128 + signal when interrupted (130 for
SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import errno as _errno
import re
import traceback
from collections.abc import Iterator
from urllib.parse import urlsplit

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

_debug = False
_destination: str | None = None  # what a conversion running now writes (for the interrupted/lost-rank lines)


class ConversionError(Exception):
    """Bad input or an impossible request; the message names the file/tensor and what was expected."""


class SourceChanged(ConversionError):
    """A read made on condition that a source file is still as pinned (S3: If-Match its ETag) found it rewritten."""


class StorageError(OSError):
    """An I/O or object-store operation failed: `cannot <op> <target>: <reason>`.

    An OSError (not a ConversionError), so code that turns malformed *content* into findings
    (`except ConversionError`) never mistakes an unreadable file for an invalid one.
    `exit_code` is the code when nothing else decides it (1: failed while running).
    """

    exit_code = EXIT_FAILED

    def __init__(self, op: str, target: str, reason: str) -> None:
        super().__init__(f"cannot {op} {target}: {reason}")
        self.op, self.target, self.reason = op, target, reason

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.op, self.target, self.reason)


class CredentialsError(StorageError):
    """An object store refused us for want of (valid) credentials: permanent, and a refusal (exit 2)."""

    exit_code = EXIT_REFUSED

    def __str__(self) -> str:
        return f"{self.reason} for {self.target}: {CREDENTIALS_HINT}"


class EndpointUnreachable(StorageError):
    """An object store's endpoint refused the connection, or its host name does not resolve: nothing a retry
    changes (a refusal, exit 2, before anything was written; exit 1 while running)."""

    def __init__(self, endpoint: str, target: str, reason: str) -> None:
        super().__init__("reach", target, reason)
        self.endpoint = endpoint

    def __str__(self) -> str:
        return f"cannot reach the S3 endpoint {self.endpoint} for {self.target}: {self.reason}"

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.endpoint, self.target, self.reason)


CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
                    "--storage-options '{\"key\": \"...\", \"secret\": \"...\"}'")
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "NoAuthTokenError", "UnauthorizedSSOTokenError"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "UnrecognizedClientException", "InvalidClientTokenId"}


def set_debug(on: bool) -> None:
    """--debug: messages of unexpected errors carry their traceback."""
    global _debug
    _debug = on


def debug_enabled() -> bool:
    """True under --debug."""
    return _debug


def set_destination(dst: str | None) -> None:
    """The destination a conversion is writing from now on (None: nothing is being written)."""
    global _destination
    _destination = dst


def resume_hint() -> str:
    """'; <dst> is incomplete; re-run the same command to resume' while a conversion writes, else ''."""
    return f"{_destination} is incomplete; re-run the same command to resume" if _destination else ""


def interrupted_line() -> str:
    """The line rank 0 prints on SIGINT/SIGTERM."""
    hint = resume_hint()
    return f"interrupted: {hint}" if hint else "interrupted"


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and its causes/contexts, outermost first."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def service_error(exc: BaseException) -> tuple[int, str, str] | None:
    """(HTTP status, error code, message) of an object store's answer found in `exc`'s chain, else None."""
    for e in chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            err = response.get("Error", {}) or {}
            return status, str(err.get("Code", "") or ""), str(err.get("Message", "") or "")
    return None


def credentials_problem(exc: BaseException) -> str | None:
    """'no credentials' / 'credentials rejected (<code>)' when `exc` comes from missing or invalid credentials."""
    for e in chain(exc):
        if type(e).__name__ in _NO_CREDENTIALS:
            return "no credentials"
    answer = service_error(exc)
    if answer and answer[1] in _BAD_CREDENTIALS:
        return f"credentials rejected ({answer[1]})"
    return None


def unreachable(exc: BaseException) -> tuple[str, str] | None:
    """(endpoint, reason) when `exc` says an object store's endpoint cannot be reached at all: the connection was
    refused ('connection refused') or the host name does not resolve ('unknown host H'); else None. A resolver's
    temporary failure (EAI_AGAIN), a timeout or a connection reset is transient, not this."""
    import socket

    endpoint = reason = host = None
    for e in chain(exc):
        url = (getattr(e, "kwargs", None) or {}).get("endpoint_url") if type(e).__name__ == "EndpointConnectionError" \
            else None
        if url and endpoint is None:
            parts = urlsplit(str(url))
            endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(url)
        if type(e).__name__.startswith("ClientConnector") and (e_host := getattr(e, "host", None)):  # aiohttp's
            host = e_host
            endpoint = endpoint or f"{host}:{getattr(e, 'port', '')}".rstrip(":")
        if reason is None and isinstance(e, socket.gaierror):
            if e.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)):
                return None  # a resolver that may answer next time
            reason = f"unknown host {host or ''}".rstrip() + (f" ({e.strerror})" if e.strerror else "")
        elif reason is None and isinstance(e, OSError) and _refused(e):
            reason = "connection refused"
    return (endpoint, reason) if endpoint and reason else None


def _refused(e: OSError) -> bool:
    """ECONNREFUSED, also asyncio's 'Multiple exceptions: [Errno 111] ..., [Errno 111] ...' (every address refused)."""
    if e.errno == _errno.ECONNREFUSED:
        return True
    codes = re.findall(r"\[Errno (\d+)\]", str(e)) if e.errno is None and str(e).startswith("Multiple exceptions") else []
    return bool(codes) and all(int(c) == _errno.ECONNREFUSED for c in codes)


def reason_of(exc: BaseException) -> str:
    """A short human reason for an I/O error: 'No space left on device (ENOSPC)', 'Access Denied (HTTP 403 AccessDenied)'."""
    answer = service_error(exc)
    if answer and answer[0]:
        status, code, message = answer
        return f"{message or code or 'error'} (HTTP {status}{' ' + code if code else ''})"
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        name = _errno.errorcode.get(exc.errno, "")
        return f"{exc.strerror} ({name})" if name else str(exc.strerror)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_comm_error(exc: BaseException) -> bool:
    """True when `exc` says another rank went away (a collective failed), not what failed there."""
    if type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("[gloo", "Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def is_internal(exc: BaseException) -> bool:
    """True for an exception no user input explains (a bug): not a refusal, an I/O error or a lost rank."""
    return not (isinstance(exc, (ConversionError, StorageError)) or (isinstance(exc, OSError) and exc.strerror)
                or is_comm_error(exc))


def describe(exc: BaseException) -> str:
    """The one-line message for `exc` (no 'error: ' prefix).

    Errors a user can cause (ConversionError, StorageError, other OSErrors) are their message;
    anything else is a bug: 'internal error: <Type>: <msg> (re-run with --debug ...)', with the
    traceback appended under --debug.
    """
    if is_internal(exc):
        text = f"internal error: {type(exc).__name__}: {exc}"
        if not _debug:
            return text + " (re-run with --debug for the traceback)"
    elif isinstance(exc, (ConversionError, StorageError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{reason_of(exc)}"
    else:
        text = "lost contact with another rank (it failed or was stopped)"
        text += f"; {resume_hint()}" if resume_hint() else ""
    if _debug:
        text += "\n" + "".join(traceback.format_exception(exc)).rstrip()
    return text


def exit_code(exc: BaseException) -> int:
    """The exit code an error stands for when nothing else decides it: 2 for refusals, else 1."""
    if isinstance(exc, ConversionError):
        return EXIT_REFUSED
    if isinstance(exc, StorageError):
        return exc.exit_code
    return EXIT_FAILED


class ErrorText(str):
    """An error's one-line message as sent between ranks; `internal` says it is a bug (exit 1, never 2)."""

    internal: bool = False


def error_text(exc: BaseException) -> ErrorText:
    """describe(exc) as an ErrorText."""
    text = ErrorText(describe(exc))
    text.internal = is_internal(exc)
    return text
