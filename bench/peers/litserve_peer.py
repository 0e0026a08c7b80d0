"""LitServe: uvicorn API server processes in front of inference worker processes, joined by queues.

Configured as LitServe's own docstrings advise: on CPU `workers_per_device` = the cores ("For CPU,
set to the number of cores"), `num_api_servers` left to its default (as many as the inference
workers, "recommended"), and `fast_queue` (ZeroMQ) on, which LitServe advises above 100 requests/s.
Batching is the LitAPI's `max_batch_size` and `batch_timeout`. The timeout is 10 ms (the Ray Serve
and mosec default), not LitServe's default of 0: at 0 a worker polls its queue without ever
sleeping (`collate_requests` loops on `get_nowait`), which takes a core from the model.

The request is the service's multipart POST /classify. The API server parses the form and queues
it; the inference worker decodes (`decode_request`), batches and runs its one single-thread session.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run time
# to choose how it parses the body, and a string is not the class it compares with.
from pathlib import Path
from typing import cast

import litserve as ls
import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from bench.peers import CLASSIFY_PATH, Peer, multipart_request, results_top1
from bench.peers.common import OnnxClassifier, ServeArgs, parse_serve_args

BATCH_TIMEOUT_S = 0.010


class ViTAPI(ls.LitAPI):
    def __init__(self, model_dir: Path, device: str, max_batch_size: int) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=BATCH_TIMEOUT_S, api_path=CLASSIFY_PATH)
        self.model_dir = model_dir
        self.model_device = device

    def setup(self, device: str) -> None:
        self.model = OnnxClassifier(self.model_dir, self.model_device)

    def decode_request(self, request: Request) -> np.ndarray:
        # Annotated as a Request so that LitServe parses the multipart body: what arrives is the form.
        parts = cast(FormData, request).getlist("file")
        return self.model.decode_all([cast(UploadFile, part).file.read() for part in parts])

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # requests carry different numbers of images: predict splits the rows back

    def predict(self, requests: list[np.ndarray] | np.ndarray) -> list[dict[str, object]] | dict[str, object]:
        if isinstance(requests, np.ndarray):  # a batch limit of one request: LitServe neither batches nor unbatches
            return self.model.classify_requests([requests])[0]
        return self.model.classify_requests(requests)

    def unbatch(self, outputs: list[dict[str, object]]) -> list[dict[str, object]]:
        return outputs

    def encode_response(self, output: dict[str, object]) -> dict[str, object]:
        return output


def describe(workers: int, max_batch_size: int, device: str) -> str:
    return (
        f"{workers} inference worker process(es) on {device}, each 1 session x 1 thread, decoding its own "
        f"requests; as many uvicorn API servers (the default); fast_queue (ZeroMQ); "
        f"max_batch_size {max_batch_size} requests, batch_timeout {BATCH_TIMEOUT_S * 1000:.0f} ms"
    )


PEER = Peer("litserve", "litserve", __name__, multipart_request, results_top1, describe, batches_requests=True)


def main(args: ServeArgs) -> None:
    server = ls.LitServer(
        ViTAPI(args.model, args.device, args.max_batch_size),
        accelerator=args.device,
        devices=1,
        workers_per_device=args.workers,
        timeout=60,
        fast_queue=True,
    )
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main(parse_serve_args(__doc__ or ""))
