"""CORS as Starlette does it, but a refused preflight answers in every error's JSON shape."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from service.errors import BadRequest, error_response


class Cors(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        # Starlette's plain-text "Disallowed CORS origin, method" becomes the error's message.
        refused = error_response(BadRequest(bytes(response.body).decode()))
        for name, value in response.headers.items():  # the CORS headers a browser reads from it
            if name not in ("content-length", "content-type"):
                refused.headers[name] = value
        return refused
