"""The inference routes are answered ahead of FastAPI's stack, so they may declare nothing that
FastAPI would have checked for them, a fault in one is answered as FastAPI's handlers would, and
they are left to FastAPI once its OpenTelemetry is on (tests/service/test_tracing.py serves it)."""

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from opentelemetry.sdk.trace import TracerProvider

from service.errors import install_error_handlers
from service.frontend.hot_routes import HotRoutes, inference_routes
from service.frontend.routes import classify, embed, v2
from tests.conftest import wait_for


def test_fastapis_opentelemetry_takes_the_inference_routes_back():
    plain = HotRoutes(FastAPI(), [])
    assert not plain.defer_to_telemetry() and plain.taking
    traced = HotRoutes(FastAPI(telemetry={"tracer_provider": TracerProvider()}), [])
    assert traced.defer_to_telemetry() and not traced.taking


def test_the_inference_routes_are_the_three_posts():
    routes = inference_routes([classify.router, embed.router, v2.router])
    assert [route.path for route in routes] == ["/classify", "/embed", "/v2/models/{name}/infer"]


def test_a_post_route_with_a_query_parameter_is_refused():
    router = APIRouter()

    @router.post("/classify")
    async def with_query(request: Request, top_k: int = 5) -> None:
        pass

    with pytest.raises(TypeError, match="bare request"):
        inference_routes([router])


def test_a_post_route_with_a_dependency_is_refused():
    router = APIRouter()

    async def api_key(request: Request) -> None:
        pass

    @router.post("/classify", dependencies=[Depends(api_key)])
    async def guarded(request: Request) -> None:
        pass

    with pytest.raises(TypeError, match="bare request"):
        inference_routes([router])


@pytest.fixture
def faulty_server() -> Iterator[str]:
    """The service's error handling around two routes that fail as a bug would, one taken by
    HotRoutes and one left to FastAPI, on a real server on loopback."""
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter()

    @router.post("/classify")
    async def broken_post(request: Request) -> None:
        raise RuntimeError("a bug")

    @router.get("/broken")
    async def broken_get() -> None:
        raise RuntimeError("a bug")

    app.include_router(router)
    server = uvicorn.Server(uvicorn.Config(HotRoutes(app, inference_routes([router])), port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    (port,) = {s.getsockname()[1] for listener in server.servers for s in listener.sockets}
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_a_fault_of_the_servers_own_is_a_json_500_and_serving_goes_on(faulty_server):
    with httpx.Client(base_url=faulty_server) as client:
        for _ in range(2):
            answer = client.post("/classify", content=b"x")
            assert answer.status_code == 500
            assert answer.json() == {"error": "internal server error", "error_type": "internal_error"}
        answer = client.get("/broken")
        assert answer.status_code == 500 and answer.json()["error_type"] == "internal_error"
