"""OpenTelemetry: a server told of a collector by the environment alone traces every route,
the inference routes included, continues the trace its caller started (a gateway's), says where
an answered request's time went, and puts the trace ID on the request's access line."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from bench.server import run_server
from tests.conftest import wait_for


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    parent_id: str
    attributes: dict[str, object]


class Collector:
    """An OTLP/HTTP receiver on loopback: keeps every span the server exports."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        received = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    received.extend(_spans(ExportTraceServiceRequest.FromString(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def server_span(self, trace_id: str) -> ReceivedSpan:
        """The server span of the request that carried `trace_id`, once it has arrived."""
        wait_for(lambda: any(s.trace_id == trace_id and s.kind == Span.SPAN_KIND_SERVER for s in self.spans))
        return next(s for s in self.spans if s.trace_id == trace_id and s.kind == Span.SPAN_KIND_SERVER)


def _spans(request: ExportTraceServiceRequest) -> Iterator[ReceivedSpan]:
    for resource in request.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                yield ReceivedSpan(span.name, span.kind, span.trace_id.hex(), span.parent_span_id.hex(), attributes)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.http.shutdown()
    collector.http.server_close()


@pytest.fixture(scope="module")
def traced(collector):
    environment = {
        "FASTAPI_OTEL_AUTO_CONFIGURE": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: the batch span processor's export interval
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    with run_server(environment=environment) as server:
        yield server
        assert server.stop() == 0


def _traceparent(number: int) -> tuple[str, str, str]:
    """A W3C traceparent header as a gateway sends it, with its trace and span IDs."""
    trace_id, span_id = f"{number:032x}", f"{number:016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_every_inference_route_is_traced_within_the_callers_trace(traced, collector, samples):
    png = samples[0].encoded()
    requests = [
        ("/classify", {"files": {"file": ("a.png", png, "image/png")}}, 200),
        ("/classify", {"content": b"not an image", "headers": {"Content-Type": "image/png"}}, 415),
        ("/embed", {"content": png, "headers": {"Content-Type": "image/png"}}, 200),
        ("/v2/models/{name}/infer", {"json": {"inputs": []}}, 400),
        ("/readyz", {}, 200),
    ]
    with traced.client() as client:
        for number, (route, options, status) in enumerate(requests, start=1):
            header, trace_id, parent_id = _traceparent(number)
            headers = {**options.pop("headers", {}), "traceparent": header}
            path = route.format(name="fashion-mnist-vit")
            method = client.get if route == "/readyz" else client.post
            response = method(path, headers=headers, **options)
            assert response.status_code == status, response.text
            span = collector.server_span(trace_id)
            assert span.parent_id == parent_id
            assert span.name == f"{'GET' if route == '/readyz' else 'POST'} {route}"
            assert span.attributes["http.route"] == route
            assert span.attributes["http.response.status_code"] == status
            if route != "/readyz":  # probes are not access-logged
                access = re.compile(f'"route": "{re.escape(route)}", "status": {status}, .*"trace_id": "{trace_id}"')
                wait_for(lambda access=access: access.search(traced.log) is not None)

            # Where an answered request's time went, as its timing headers say it.
            timed = [s.attributes for s in collector.spans if s.trace_id == trace_id and "vit.images" in s.attributes]
            assert len(timed) == (status == 200 and route != "/readyz")
            if timed:
                (attributes,) = timed
                assert attributes["vit.images"] == 1
                for name, header in (("queue_wait", "Queue"), ("inference", "Inference"), ("preprocess", "Preprocess")):
                    assert attributes[f"vit.{name}_ms"] == pytest.approx(
                        float(response.headers[f"X-{header}-Time-Ms"]), abs=0.006
                    )
            if route == "/classify" and status == 200:
                assert response.json()["results"][0]["predictions"][0]["label"] == samples[0].label
        # The service's own metrics and access lines still name each route.
        counted = client.get("/metrics").text
        for route, _, status in requests[:-1]:
            assert f'vit_requests_total{{route="{route}",status="{status}"}}' in counted
    assert "the inference routes go through FastAPI's stack" in traced.log
    assert '"route": "/v2/models/{name}/infer", "status": 400' in traced.log
