"""Domain errors, each with a transport-neutral status `Code` (the gRPC/Triton status names): what a
client should be told. Each frontend maps a `Code` to its wire status in one place
(`server.status`: the gRPC status and the HTTP status); nothing here imports a transport.

Client-visible messages never carry absolute paths or Python exception text (those go to the
server log); strings a client sent are shown through `clip` (repr-style, truncated), in messages
and in logs alike.
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)

CLIP_CHARS = 64  # longest client-supplied string shown in a message or log line


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """`value` as repr() shows it, cut to `limit` characters (then `...+N chars`): safe to put in a
    message or a log line whatever a client sent (control characters escaped, length bounded)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}...(+{len(value) - limit} chars)"
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit + 2 else f"{text[:limit]}...(+{len(text) - limit} chars)"


class Code(enum.Enum):
    """The status of a failed call, named as gRPC and Triton name it (every gRPC status code, so a
    frontend's table can be checked complete); `server.status` maps it to gRPC and HTTP."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class ServingError(Exception):
    """An error a client should see, with the status `Code` it maps to."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = Code.INVALID_ARGUMENT


class NotFound(ServingError):
    code = Code.NOT_FOUND


class Unavailable(ServingError):
    code = Code.UNAVAILABLE


class ModelControlDisabled(Unavailable):
    """RepositoryModelLoad/Unload while the model-control mode is not `explicit`. UNAVAILABLE, as
    Triton answers ("explicit model load / unload is not allowed if polling is enabled")."""


class ResourceExhausted(ServingError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = Code.DEADLINE_EXCEEDED


class Unauthenticated(ServingError):
    code = Code.UNAUTHENTICATED


class Cancelled(ServingError):
    """The client went away (or the call was cancelled) while its model ran: the run was stopped."""

    code = Code.CANCELLED


class StartupError(Exception):
    """The server cannot start as configured (bad flag, CUDA asked for but unusable, a model that
    failed to load with --exit-on-error, an auth-token source holding no token)."""


class FailedPrecondition(ServingError):
    code = Code.FAILED_PRECONDITION


class AlreadyExists(ServingError):
    code = Code.ALREADY_EXISTS


class Unimplemented(ServingError):
    """A feature this server does not have (CUDA shared memory; system shared memory when off)."""

    code = Code.UNIMPLEMENTED


INTERNAL_MESSAGE = "internal error; the server log has the details"


def to_status(exc: BaseException) -> tuple[Code, str]:
    """The single mapping from exceptions to (status code, client message). An unexpected error is
    INTERNAL with a fixed message; its type, text and traceback go to the server log only."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    log.error("unexpected error: %s", clip(f"{type(exc).__name__}: {exc}", 500), exc_info=exc)
    return Code.INTERNAL, INTERNAL_MESSAGE
