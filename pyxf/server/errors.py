"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the HTTP status.

Every failure a client can cause is an APIError with a 4xx status; only a bug in the server answers
500 (server_error), and it never affects other requests.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_S = 1  # what a 503 asks clients to wait before trying again


class APIError(Exception):
    """An error answered as OpenAI does: status, message, type, param (the offending request field)
    and code (a stable machine-readable name)."""

    def __init__(self, status, message, *, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self):
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status, message, type, param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(message, param=None, code="invalid_value"):
    """400: a parameter with a value the server cannot take."""
    return APIError(400, message, param=param, code=code)


def unsupported(message, param):
    """400: a parameter OpenAI defines that pyxf does not implement."""
    return APIError(400, message, param=param, code="unsupported_parameter")


def model_not_found(name, known):
    listed = ", ".join(sorted(known)) or "none"
    return APIError(
        404, f"The model {name!r} does not exist; served models: {listed}", param="model", code="model_not_found"
    )


def unauthorized():
    return APIError(
        401, "Invalid or missing API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key"
    )


def too_large(limit_bytes):
    return APIError(413, f"Request body is larger than the limit of {limit_bytes} bytes", code="request_too_large")


def overloaded(message):
    """503 with Retry-After: the engine's queue is full, or the server is shutting down."""
    return APIError(
        503, message, type="server_error", code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def install_handlers(app: FastAPI):
    """Answers every error with OpenAI's body: ours, FastAPI's validation errors (400, naming the
    field), unknown routes and methods, and (as 500) anything unexpected."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return validation_error_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return error_response(500, f"Internal server error: {type(exc).__name__}: {exc}", "server_error")


def validation_error_response(errors):
    """400 for the first problem pydantic found; param is the field's dotted path in the body."""
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "Invalid request")
    if first.get("type") == "json_invalid":
        message, param = "The request body is not valid JSON", None
    elif param:
        message = f"{param}: {message}"
    return error_response(400, message, "invalid_request_error", param, "invalid_value")
