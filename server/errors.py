"""Domain errors that carry their gRPC status: the one place where errors map to status codes."""

from __future__ import annotations

import grpc


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


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServingError):
    code = grpc.StatusCode.INTERNAL


class StartupError(Exception):
    """The server cannot start as configured (bad flag, CUDA asked for but unusable)."""


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION
