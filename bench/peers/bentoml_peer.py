"""BentoML: `bentoml serve` starts worker processes, each an HTTP server with its own adaptive batcher.

Configured as BentoML's guides describe: `workers` = the cores on CPU ("Workers": one process per
core for CPU-bound models; one per GPU), and the endpoint `@bentoml.api(batchable=True)` with
`max_batch_size` and `max_latency_ms` ("Adaptive batching"). The batcher picks its own wait from
the latencies it observes; max_latency_ms is only the bound it must keep, left at its default
(60 s, the same bound as the bench's own timeouts).

The request is the service's multipart POST /classify: the batchable parameter is a list of file
uploads (`file: list[Path]`), so a request of N images adds N items to a batch. BentoML writes each
upload to a temporary file before the method sees it, as it does for every file input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml

from bench.peers import Peer, multipart_request
from bench.peers.common import ENV_DEVICE, ServeArgs, classifier_from_variables, model_variables, parse_serve_args

# `bentoml serve` imports this module in every worker: the bench's arguments travel as variables.
ENV_WORKERS, ENV_BATCH = "VIT_PEER_WORKERS", "VIT_PEER_BATCH"
WORKERS = int(os.environ.get(ENV_WORKERS, "1"))
DEVICE = os.environ.get(ENV_DEVICE, "cpu")
MAX_BATCH = int(os.environ.get(ENV_BATCH, "8"))
RESOURCES = {"gpu": 1} if DEVICE == "cuda" else {"cpu": WORKERS}


@bentoml.service(workers=WORKERS, resources=RESOURCES, traffic={"timeout": 60})
class ViTClassifier:
    def __init__(self) -> None:
        self.model = classifier_from_variables()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH)
    def classify(self, file: list[Path]) -> list[dict[str, object]]:
        pixels = self.model.decode_all([path.read_bytes() for path in file])
        return [{"predictions": predictions} for predictions in self.model.classify(pixels)]


def top1(body: bytes) -> list[int]:
    """One answer per image: [{"predictions": [...]}, ...]."""
    import json

    return [int(item["predictions"][0]["class_id"]) for item in json.loads(body)]


def describe(workers: int, max_batch_size: int, device: str) -> str:
    return (
        f"{workers} worker process(es) on {device}, each HTTP + its adaptive batcher + 1 session x 1 thread; "
        f"batchable=True, max_batch_size {max_batch_size} images, max_latency_ms 60000 (default)"
    )


PEER = Peer("bentoml", "bentoml", __name__, multipart_request, top1, describe)


def main(args: ServeArgs) -> None:
    os.environ.update(
        {
            **model_variables(args),
            ENV_WORKERS: str(args.workers),
            ENV_BATCH: str(args.max_batch_size),
        }
    )
    command = ["bentoml", "serve", f"{__spec__.name}:ViTClassifier", "--host", "127.0.0.1", "--port", str(args.port)]
    # Same pid: the bench counts CPU from this process down.
    os.execv(sys.executable, [sys.executable, "-m", *command])


if __name__ == "__main__":
    main(parse_serve_args(__doc__ or ""))
