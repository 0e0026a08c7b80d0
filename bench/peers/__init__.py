"""The servers users would pick instead of this service, each serving the same graph.

One module per peer, importing its framework: the framework's server code, how it is configured,
and a `Peer` that tells the bench how to talk to it. Each runs (its `main`) as
`python -m bench.peers.<module> --model DIR --device cpu|cuda --port N --workers W --max-batch-size B`.
This package itself imports no framework, so the bench runs (and reports a peer as not installed)
in any venv; `make bench-peers` installs them all.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass

from bench.load import multipart_upload

CLASSIFY_PATH = "/classify"


@dataclass(frozen=True)
class Peer:
    name: str  # as the tables and --only name it
    distribution: str  # the PyPI distribution whose version the report gives
    module: str  # `python -m <module> ...` serves it
    # (url, images, content type) -> one complete HTTP/1.1 request carrying the images
    request: Callable[[str, list[bytes], str], bytes]
    top1: Callable[[bytes], list[int]]  # response body -> each image's top-1 class id
    # (workers, max batch size, device) -> how it is configured, in words, for the report
    describe: Callable[[int, int, str], str]
    # Its batch limit counts requests, not images along a batch dimension: see batch_limit.
    batches_requests: bool = False

    def batch_limit(self, max_images: int, images_per_request: int) -> int:
        """Its batch limit, in its own unit, for at most `max_images` images in a forward pass."""
        return max(1, max_images // images_per_request) if self.batches_requests else max_images


@dataclass(frozen=True)
class Entry:
    name: str
    module: str  # the peer's module, which defines PEER
    needs: str  # the import name of its framework


ENTRIES = [
    Entry("litserve", "bench.peers.litserve_peer", "litserve"),
    Entry("bentoml", "bench.peers.bentoml_peer", "bentoml"),
    Entry("rayserve", "bench.peers.rayserve_peer", "ray.serve"),
    Entry("pytriton", "bench.peers.pytriton_peer", "pytriton"),
    Entry("mosec", "bench.peers.mosec_peer", "mosec"),
    Entry("torchserve", "bench.peers.torchserve_peer", "ts"),
]
NAMES = [entry.name for entry in ENTRIES]


def installed(entry: Entry) -> bool:
    top = entry.needs.split(".")[0]
    return importlib.util.find_spec(top) is not None and importlib.util.find_spec(entry.needs) is not None


def load(entry: Entry) -> Peer:
    """The peer's `Peer` (imports its framework: check `installed` first)."""
    peer = importlib.import_module(entry.module).PEER
    assert isinstance(peer, Peer)
    return peer


def multipart_request(url: str, images: list[bytes], content_type: str) -> bytes:
    """The service's own request: POST /classify, one multipart `file` part per image."""
    return multipart_upload(url, CLASSIFY_PATH, images, content_type)


def results_top1(body: bytes) -> list[int]:
    """Top-1 ids from the service's response shape: {"results": [{"predictions": [...]}, ...]}."""
    return [int(result["predictions"][0]["class_id"]) for result in json.loads(body)["results"]]
