"""The inference routes are answered ahead of FastAPI's stack, so they may declare nothing that
FastAPI would have checked for them."""

import pytest
from fastapi import APIRouter, Depends, Request

from service.frontend.hot_routes import inference_routes
from service.frontend.routes import classify, embed, v2


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
