"""Every limit and every kind of bad input: the right status, a JSON body, and the server keeps serving."""

import io

import pytest
from PIL import Image

from bench.server import run_server
from tests.conftest import encode

LIMITS = {"max_body_bytes": 300_000, "max_image_pixels": 1_000_000, "max_images_per_request": 4, "max_queue_images": 8}


@pytest.fixture(scope="module")
def limited():
    with run_server(**LIMITS) as server, server.client() as client:
        yield client
        assert server.stop() == 0


@pytest.fixture
def png(samples) -> bytes:
    return samples[0].encoded("PNG")


def _expect(response, status: int, error_type: str, part: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error_type"] == error_type and body["error"]
    if part is not None:
        assert body["part"] == part
    return body


def test_declared_body_over_the_limit_is_refused_before_reading(limited):
    response = limited.post("/classify", content=b"\xff" * 400_000, headers={"content-type": "image/jpeg"})
    _expect(response, 413, "payload_too_large")


def test_chunked_body_over_the_limit_is_refused_while_reading(limited):
    def chunks():
        for _ in range(100):
            yield b"\x00" * 10_000

    response = limited.post("/classify", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert "content-length" not in response.request.headers
    _expect(response, 413, "payload_too_large")


def test_image_pixels_over_the_limit_name_the_part(limited, png):
    big = encode(Image.new("L", (2000, 2000)), "PNG")  # 4 MP in a few kB
    files = [("file", ("ok.png", png, "image/png")), ("file", ("big.png", big, "image/png"))]
    _expect(limited.post("/classify", files=files), 413, "image_too_large", part="big.png")


def test_too_many_images(limited, png):
    files = [("file", (f"{i}.png", png, "image/png")) for i in range(5)]
    _expect(limited.post("/classify", files=files), 413, "too_many_images")
    _expect(limited.post("/classify", json={"images": ["AAAA"] * 5}), 413, "too_many_images")
    # Far more than any request may hold is refused by its size, before it is parsed.
    _expect(limited.post("/classify", json={"images": [""] * 2000}), 413, "payload_too_large")


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "video/mp4"])
def test_unsupported_content_types(limited, png, content_type):
    _expect(
        limited.post("/classify", content=png, headers={"content-type": content_type}), 415, "unsupported_media_type"
    )


def test_unsupported_image_format_names_the_part(limited, png):
    icon = io.BytesIO()
    Image.new("RGB", (16, 16)).save(icon, "ICO")
    files = [("file", ("a.png", png, "image/png")), ("file", ("icon.ico", icon.getvalue(), "image/x-icon"))]
    _expect(limited.post("/classify", files=files), 415, "unsupported_image_format", part="icon.ico")


def test_corrupt_and_truncated_images_name_the_part(limited, png):
    files = [("file", ("good.png", png, "image/png")), ("file", ("cut.png", png[: len(png) // 2], "image/png"))]
    _expect(limited.post("/classify", files=files), 422, "corrupt_image", part="cut.png")


@pytest.mark.parametrize(
    ("bad", "named"),
    [({1, 3}, "1.png"), ({3}, "3.png"), ({0, 2}, "0.png"), ({2, 3}, "2.png")],
)
def test_of_several_bad_images_the_first_in_the_request_is_named(limited, png, bad, named):
    cut = png[: len(png) // 2]
    files = [("file", (f"{i}.png", cut if i in bad else png, "image/png")) for i in range(4)]
    _expect(limited.post("/classify", files=files), 422, "corrupt_image", part=named)


@pytest.mark.parametrize(
    ("kwargs", "error_type"),
    [
        ({"content": b"", "headers": {"content-type": "image/png"}}, "no_image"),
        ({"content": b""}, "no_image"),
        ({"json": {"images": []}}, "no_image"),
        ({"files": {"other": ("x.png", b"abc", "image/png")}}, "no_image"),
        ({"files": {"file": ("empty.png", b"", "image/png")}}, "no_image"),
        ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, "bad_request"),
        (
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            "bad_request",
        ),
        ({"json": {"images": ["***not base64***"]}}, "bad_request"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "bad_request"),
        ({"json": {"pictures": []}}, "bad_request"),
    ],
)
def test_empty_and_malformed_bodies_are_400(limited, kwargs, error_type):
    _expect(limited.post("/classify", **kwargs), 400, error_type)


@pytest.mark.parametrize("query", ["top_k=0", "top_k=11", "top_k=abc"])
def test_invalid_top_k_is_422(limited, png, query):
    _expect(
        limited.post(f"/classify?{query}", content=png, headers={"content-type": "image/png"}), 422, "invalid_parameter"
    )


def test_unknown_routes_answer_json_too(limited):
    _expect(limited.get("/nope"), 404, "not_found")
    _expect(limited.get("/classify"), 405, "method_not_allowed")


def test_server_still_serves_after_every_kind_of_bad_input(limited, samples):
    response = limited.post("/classify", files={"file": ("x.png", samples[0].encoded(), "image/png")})
    assert response.status_code == 200
    assert limited.get("/readyz").status_code == 200
