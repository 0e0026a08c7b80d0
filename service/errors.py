"""Typed service errors, raised where a problem is detected and turned into JSON in one place."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ServiceError(Exception):
    """Base of every error the API reports; `status` and `error_type` are the response's."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, part: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.part = part  # which upload of a multi-image request failed
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.message, "error_type": self.error_type}
        if self.part is not None:
            body["part"] = self.part
        return body

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(ServiceError):
    status, error_type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, error_type = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NoImage(ServiceError):
    status, error_type = 400, "no_image"


class ModelNotFound(ServiceError):
    status, error_type = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, error_type = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    status, error_type = 413, "image_too_large"


class TooManyImages(ServiceError):
    status, error_type = 413, "too_many_images"


class UnsupportedMediaType(ServiceError):
    status, error_type = 415, "unsupported_media_type"


class UnsupportedImageFormat(ServiceError):
    status, error_type = 415, "unsupported_image_format"


class CorruptImage(ServiceError):
    status, error_type = 422, "corrupt_image"


class InvalidParameter(ServiceError):
    status, error_type = 422, "invalid_parameter"


class Overloaded(ServiceError):
    status, error_type = 429, "overloaded"


class NotReady(ServiceError):
    status, error_type = 503, "not_ready"


class _Leaving(ServiceError):
    """A 503 from a server on its way out."""

    def headers(self) -> dict[str, str]:
        # Closed after the answer: a keep-alive client would send its retry down the same connection,
        # to this server again, instead of through the gateway to another replica.
        return {**super().headers(), "Connection": "close"}


class Draining(_Leaving):
    status, error_type = 503, "draining"


class NotReadyDraining(_Leaving, NotReady):
    """The engine stopped while the server drains: none will come back."""


class DeadlineExceeded(ServiceError):
    status, error_type = 504, "deadline_exceeded"

    def __init__(self, message: str, *, body_unread: bool = False) -> None:
        super().__init__(message)
        self.body_unread = body_unread

    def headers(self) -> dict[str, str]:
        # The rest of a body that stalled may never come; the connection goes with the request.
        return {"Connection": "close"} if self.body_unread else {}


class BodyTooSlow(DeadlineExceeded):
    status, error_type = 408, "body_too_slow"

    def __init__(self, message: str) -> None:
        super().__init__(message, body_unread=True)


class ClientDisconnected(ServiceError):
    # nginx's "client closed request": nobody reads this answer, but logs and metrics do.
    status, error_type = 499, "client_disconnected"


class InferenceFailed(ServiceError):
    status, error_type = 500, "inference_failed"


class StartupError(RuntimeError):
    """The service cannot start as configured (bad model folder, provider not available)."""


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def fault_response() -> JSONResponse:
    """The answer to a fault of the server's own (a bug): a 500 in the shape of every other error."""
    return error_response(ServiceError("internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(InvalidParameter(details))

    async def on_fault(request: Request, exc: Exception) -> JSONResponse:
        # Starlette sends this answer, then raises the exception again for uvicorn to log.
        return fault_response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (404, 405) keep their status but get the same body shape as ours.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(ServiceError, on_service_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_fault)
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
