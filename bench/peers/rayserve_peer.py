"""Ray Serve: a local Ray cluster (GCS, raylet, workers), an HTTP proxy actor and model replicas.

Configured as Ray Serve's guides describe: `num_replicas` = the cores on CPU, each replica reserving
one CPU (one per GPU on CUDA), and `@serve.batch` on an async method ("Dynamic request batching")
with `max_batch_size` and `batch_wait_timeout_s` left at its default of 10 ms. Each replica's
`max_ongoing_requests` is twice the batch size: the guide asks for at least `max_batch_size` (Serve
warns below it), and the second half lets the next batch gather while one runs. The dashboard is
off: it serves no request, and on two cores it would take CPU from those that do.

The request is the service's multipart POST /classify; the replica parses the form (Starlette, as
in Serve's examples), decodes, and hands each image to the batched method as one item.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from bench.peers import CLASSIFY_PATH, Peer, multipart_request, results_top1
from bench.peers.common import OnnxClassifier, ServeArgs, interrupt_on_sigterm, parse_serve_args, results

BATCH_WAIT_S = 0.01  # @serve.batch's default


class ViTDeployment:
    def __init__(self, model_dir: Path, device: str, max_batch_size: int) -> None:
        self.model = OnnxClassifier(model_dir, device)
        # @serve.batch's own setter, which its type does not show (where ray is installed)
        self.classify_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined,unused-ignore]

    @serve.batch(batch_wait_timeout_s=BATCH_WAIT_S)
    async def classify_batch(self, images: list[np.ndarray]) -> list[list[dict[str, object]]]:
        return self.model.classify(np.stack(images))

    async def __call__(self, request: Request) -> JSONResponse:
        form = await request.form()
        uploads = [await part.read() for part in form.getlist("file")]  # type: ignore[union-attr]
        pixels = self.model.decode_all(uploads)
        predictions = await asyncio.gather(*(self.classify_batch(image) for image in pixels))
        # A Response, not a dict: for a dict the proxy streams the body chunked, with no
        # Content-Length, which the load generator (and many clients) will not read.
        return JSONResponse(results(list(predictions)))


def describe(workers: int, max_batch_size: int, device: str) -> str:
    return (
        f"{workers} replica(s) on {device}, each 1 {'GPU' if device == 'cuda' else 'CPU'} and 1 session x 1 thread, "
        f"max_ongoing_requests {2 * max_batch_size}; @serve.batch max_batch_size {max_batch_size} images, "
        f"batch_wait_timeout_s {BATCH_WAIT_S} (default); one HTTP proxy; dashboard off"
    )


PEER = Peer("rayserve", "ray", __name__, multipart_request, results_top1, describe, batches_requests=True)


def main(args: ServeArgs) -> None:
    interrupt_on_sigterm()
    ray.init(include_dashboard=False, num_cpus=None if args.device == "cuda" else args.workers)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        resources = {"num_gpus": 1} if args.device == "cuda" else {"num_cpus": 1}
        deployment = serve.deployment(
            num_replicas=args.workers, ray_actor_options=resources, max_ongoing_requests=2 * args.max_batch_size
        )(ViTDeployment)
        app = deployment.bind(args.model.resolve(), args.device, args.max_batch_size)
        serve.run(app, route_prefix=CLASSIFY_PATH, name="vit")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(parse_serve_args(__doc__ or ""))
