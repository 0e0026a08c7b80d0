"""mosec: a Rust HTTP server and batcher in front of Python worker processes, stage after stage.

Configured as mosec's documentation describes a CPU-bound pipeline: a decode stage with one process
per core and no batching, then an inference stage with dynamic batching (`append_worker(...,
max_batch_size=B)`, `max_wait_time` left at mosec's default of 10 ms) and one process per core on
CPU (one on a GPU), each with its own single-thread session. The request timeout is raised from
mosec's 3 s to 60 s, the bound every other server here gets.

mosec hands a worker the raw body without its headers, and has no multipart parser: the decode
stage splits the service's multipart body itself (the boundary is the body's first line).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from mosec import Server, Worker

from bench.peers import CLASSIFY_PATH, Peer, multipart_request, results_top1
from bench.peers.common import (
    ENV_MODEL,
    ServeArgs,
    classifier_from_variables,
    decode_all,
    decoder_for,
    model_variables,
    multipart_files,
    parse_serve_args,
)
from model_export.manifest import Manifest
from service.settings import available_cores

TIMEOUT_MS = 60_000


class Decode(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = decoder_for(Manifest.read(Path(os.environ[ENV_MODEL])))

    def deserialize(self, data: bytes) -> bytes:
        return data  # the raw multipart body, not JSON

    def forward(self, body: bytes) -> np.ndarray:
        return decode_all(self.decoder, multipart_files(body))


class Infer(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = classifier_from_variables()

    def forward(self, requests: list[np.ndarray] | np.ndarray) -> list[dict[str, object]] | dict[str, object]:
        if isinstance(requests, np.ndarray):  # a batch limit of one request: mosec hands it over alone
            return self.model.classify_requests([requests])[0]
        return self.model.classify_requests(requests)


def describe(workers: int, max_batch_size: int, device: str) -> str:
    cores = available_cores() if device == "cuda" else workers
    return (
        f"decode stage: {cores} process(es), no batching; inference stage: {workers} process(es) on {device}, "
        f"each 1 session x 1 thread, max_batch_size {max_batch_size} requests, max_wait_time 10 ms (default)"
    )


PEER = Peer("mosec", "mosec", __name__, multipart_request, results_top1, describe, batches_requests=True)


def main(args: ServeArgs) -> None:
    os.environ.update(
        {
            **model_variables(args),
            "MOSEC_ADDRESS": "127.0.0.1",
            "MOSEC_PORT": str(args.port),
            "MOSEC_TIMEOUT": str(TIMEOUT_MS),
        }
    )
    sys.argv = sys.argv[:1]  # mosec parses the command line too; its settings came as MOSEC_* above
    decoders = args.workers if args.device == "cpu" else available_cores()
    server = Server()
    server.append_worker(Decode, num=decoders, route=CLASSIFY_PATH)
    server.append_worker(Infer, num=args.workers, max_batch_size=args.max_batch_size, route=CLASSIFY_PATH)
    server.run()


if __name__ == "__main__":
    main(parse_serve_args(__doc__ or ""))
