"""Errors the server answers with a status code, and how library errors map onto them.

Each becomes OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from ..errors import NumericalError, RLSEditError, StateError


class ServeError(RLSEditError):
    """A refused HTTP request: ``status`` and OpenAI's ``type``/``code``/``param``."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class AuthenticationError(ServeError):
    status = 401
    type = "authentication_error"


class PermissionDeniedError(ServeError):
    status = 403
    type = "permission_error"


class NotFoundError(ServeError):
    status = 404
    type = "not_found_error"


class ConflictError(ServeError):
    status = 409
    type = "conflict_error"


class PayloadTooLargeError(ServeError):
    status = 413


class UnavailableError(ServeError):
    status = 503
    type = "server_error"


def error_fields(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """``(status, type, code, param)`` of an exception raised while serving a request."""
    if isinstance(exc, ServeError):
        return exc.status, exc.type, exc.code, exc.param
    if isinstance(exc, NumericalError):
        return 422, "invalid_request_error", "numerical_error", None
    if isinstance(exc, StateError):
        return 500, "server_error", "state_error", None
    if isinstance(exc, RLSEditError):  # invalid input, not supported by the method, bad evaluation data
        return 400, "invalid_request_error", None, None
    return 500, "server_error", None, None
