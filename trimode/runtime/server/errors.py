"""OpenAI-style error bodies, and the handlers that turn every failure into one.

No handler ever puts a traceback in a response: validation errors become a 400 naming the
field, anything unexpected becomes a 500 with a fixed message (and is logged here).
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("trimode.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "unavailable_error",
}


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def _field_name(part) -> bool:
    # loc also holds pydantic's union-member tags ("list[TextPart]", "function-after[...]").
    return isinstance(part, int) or (re.fullmatch(r"[A-Za-z_]\w*", part) is not None
                                     and part not in ("str", "int", "float", "bool", "list", "dict"))


def _describe_validation(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    # loc is ("body", field, ...); the body itself failing to parse has loc ("body", offset).
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and _field_name(part)]
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    message = message.removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError):
        message, param = _describe_validation(err)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):
        log.exception("unhandled error while serving a request")
        return error_response(500, "internal server error")
