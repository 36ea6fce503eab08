"""Domain errors that carry their gRPC status: the one place where errors map to status codes.

Client-visible messages never carry absolute paths or Python exception text (those go to the
server log); strings a client sent are shown through `clip` (repr-style, truncated), in messages
and in logs alike.
"""

from __future__ import annotations

import logging

import grpc

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


class ServingError(Exception):
    """An error a client should see, with the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class ModelControlDisabled(Unavailable):
    """RepositoryModelLoad/Unload while the model-control mode is not `explicit`. UNAVAILABLE, as
    Triton answers ("explicit model load / unload is not allowed if polling is enabled")."""


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(ServingError):
    """The client went away (or the call was cancelled) while its model ran: the run was stopped."""

    code = grpc.StatusCode.CANCELLED


class Internal(ServingError):
    code = grpc.StatusCode.INTERNAL


class StartupError(Exception):
    """The server cannot start as configured (bad flag, CUDA asked for but unusable, a model that
    failed to load with --exit-on-error, an auth-token source holding no token)."""


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unimplemented(ServingError):
    """A feature this server does not have (CUDA shared memory; system shared memory when off)."""

    code = grpc.StatusCode.UNIMPLEMENTED


INTERNAL_MESSAGE = "internal error; the server log has the details"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The single mapping from exceptions to (gRPC status, client message). An unexpected error is
    INTERNAL with a fixed message; its type, text and traceback go to the server log only."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    log.error("unexpected error: %s", clip(f"{type(exc).__name__}: {exc}", 500), exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
