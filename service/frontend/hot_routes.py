"""The inference routes, taken ahead of FastAPI's own stack.

FastAPI declares them (the OpenAPI document) and serves every request this does not take. But a
POST through it passes its middleware layers, its router's match against every route and its
request handler: about a tenth of a front-end's CPU per request (trivial graph, 64 connections,
2 front-ends: 2.13 against 2.37 ms, four runs of each). These endpoints take the bare request and
their path parameters and raise typed errors, so a POST to one of them goes to it directly, and
an error is answered by the same `error_response` as FastAPI's handlers.

Once FastAPI's OpenTelemetry is on (a tracer, meter or logger provider configured, as FastAPI does
from the environment when its lifespan starts), they go through FastAPI too: its stack is what
opens a request's span, continues a gateway's trace and records its HTTP metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from service.errors import ServiceError, error_response, fault_response

logger = logging.getLogger(__name__)


def inference_routes(routers: Iterable[APIRouter]) -> list[APIRoute]:
    """The routers' POST routes; each must take only the request and its path parameters, since
    nothing here would check what FastAPI declares (a query model, a dependency)."""
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute) and "POST" in (r.methods or ())]
    for route in routes:
        declared = route.dependant
        if any((declared.query_params, declared.header_params, declared.cookie_params, declared.body_params)) or (
            declared.dependencies
        ):
            raise TypeError(f"{route.path}: an inference route takes the bare request and its path parameters only")
    return routes


def fastapi_telemetry_on(app: FastAPI) -> bool:
    """Whether FastAPI traces, meters or logs its requests through OpenTelemetry."""
    # FastAPI has no public query for this: its own check. Should a release move it, the inference
    # routes go untraced rather than the server failing to start (tests/service/test_tracing.py fails).
    telemetry = getattr(app, "_native_telemetry", None)
    return telemetry is not None and bool(telemetry.enabled())


class HotRoutes:
    def __init__(self, app: FastAPI, routes: list[APIRoute]) -> None:
        self.app = app
        self.routes = routes
        self.taking = True

    def defer_to_telemetry(self) -> bool:
        """Leave the inference routes to FastAPI if its OpenTelemetry is on; True if so. Called
        once the lifespan has started, when FastAPI has configured it."""
        self.taking = not fastapi_telemetry_on(self.app)
        return not self.taking

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.taking and scope["type"] == "http" and scope["method"] == "POST":
            if self.app.root_path:  # as FastAPI sets it: the routes match the path below it
                scope["root_path"] = self.app.root_path
            for route in self.routes:
                match, found = route.matches(scope)
                if match is Match.FULL:
                    scope.update(found, app=self.app)  # as Starlette's router leaves it: route, path_params
                    await self._answer(route, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _answer(route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request=request, **scope["path_params"])
        except ServiceError as exc:
            response = error_response(exc)
        except Exception:
            # FastAPI's stack, whose handler answers these elsewhere, is not here to catch it.
            logger.exception("unexpected error in %s", route.path)
            response = fault_response()
        await response(scope, receive, send)
