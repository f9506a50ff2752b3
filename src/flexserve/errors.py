"""One error hierarchy: each error knows its OpenAI `type`, `code` and HTTP status.

`api/` turns any of them into `{"error": {"message", "type", "code", "param"}}`, so the
official client raises the matching class (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 413 APIStatusError, 429 RateLimitError,
503 InternalServerError).
"""

from __future__ import annotations

from typing import ClassVar


class FlexserveError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


class InvalidRequest(FlexserveError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class UnsupportedValue(InvalidRequest):
    code = "unsupported_value"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidApiKey(FlexserveError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class TierNotAllowed(FlexserveError):
    status = 403
    type = "invalid_request_error"
    code = "tier_not_allowed"


class AdminRequired(FlexserveError):
    status = 403
    type = "invalid_request_error"
    code = "admin_required"


class ModelNotFound(FlexserveError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(FlexserveError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(FlexserveError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(FlexserveError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ResourceUnavailable(FlexserveError):
    """Flex/batch cannot start by its deadline, or the flex queue is full. Never billed."""

    status = 429
    type = "rate_limit_error"
    code = "resource_unavailable"


class RateLimitExceeded(FlexserveError):
    """The key is over its own requests, tokens or concurrency limit (api/limits.py)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(FlexserveError):
    """An interactive job waited longer than `interactive_max_wait`."""

    status = 503
    type = "server_error"
    code = "overloaded"


class StoreUnavailable(FlexserveError):
    """The database cannot be reached to look up a key not seen recently: retry soon."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


class EngineFailure(FlexserveError):
    status = 500
    type = "server_error"
    code = "engine_error"
