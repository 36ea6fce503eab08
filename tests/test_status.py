"""The one error-to-status mapping (`server.status`): every neutral code has its gRPC status and its
HTTP status, and each domain error answers as the frontends always answered."""

from __future__ import annotations

import logging

import grpc
import pytest

from server import errors
from server.handlers import error_status as handlers_error_status
from server.status import GRPC_STATUS, HTTP_STATUS, error_status


def test_every_code_maps_to_its_grpc_namesake_and_an_http_status():
    assert {c.name for c in errors.Code} == {c.name for c in grpc.StatusCode}
    assert all(GRPC_STATUS[c] is grpc.StatusCode[c.name] for c in errors.Code)
    assert set(HTTP_STATUS) == set(errors.Code) and all(100 <= s <= 599 for s in HTTP_STATUS.values())


@pytest.mark.parametrize(
    ("error", "grpc_code", "http"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND, 404),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
        (errors.ModelControlDisabled, grpc.StatusCode.UNAVAILABLE, 503),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
        (errors.Cancelled, grpc.StatusCode.CANCELLED, 499),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, 409),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED, 501),
    ],
)
def test_domain_errors_answer_with_their_status(error, grpc_code, http):
    assert error_status(error("input 'x': bad")) == (grpc_code, http, "input 'x': bad")
    assert handlers_error_status is error_status  # the frontends' import path still answers


def test_an_unexpected_error_is_internal_with_a_fixed_message(caplog):
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        got = error_status(KeyError("/secret/path"))
    assert got == (grpc.StatusCode.INTERNAL, 500, errors.INTERNAL_MESSAGE)
    assert "/secret/path" in caplog.text  # the details go to the log only
