"""The one mapping from a domain error's status `Code` (`server.errors`) to each frontend's wire
status: the gRPC status (`GRPC_STATUS`) and the HTTP status (`HTTP_STATUS`, Triton's choices where
it makes one; 499 is the de-facto "client closed request"). Both frontends (and the Ray Serve
deployment) import it; the data plane does not (it stays free of grpc).
"""

from __future__ import annotations

import grpc

from server.errors import Code, to_status

GRPC_STATUS: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}

HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, int, str]:
    """(gRPC status, HTTP status, client message) for an exception: a domain error (`server.errors`)
    carries its status `Code` (`errors.to_status`); anything else is INTERNAL / 500, with a fixed
    message for the client and the details in the log."""
    code, message = to_status(exc)
    return GRPC_STATUS[code], HTTP_STATUS[code], message
