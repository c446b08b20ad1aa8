"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``, mapped in one place."""

from __future__ import annotations

import logging

from swarm.errors import MissingBlocksError, StamenError
from swarm.net.rpc import ServerFailure

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the HTTP client with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers: dict[str, str] = {}  # extra response headers (Retry-After of a 429)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request we cannot or will not serve as sent."""
    return APIError(400, message, "invalid_request_error", param, code)


def from_exception(exc: BaseException) -> APIError:
    """The answer for an error raised while serving a request (the only place exceptions become statuses)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MissingBlocksError):
        return APIError(
            503, f"The swarm cannot serve this model right now: {exc}", "service_unavailable", None, "missing_blocks"
        )
    if isinstance(exc, StamenError | ServerFailure):
        return APIError(502, f"The swarm failed to answer: {exc}", "server_error", None, "swarm_error")
    logger.error("Unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error")
