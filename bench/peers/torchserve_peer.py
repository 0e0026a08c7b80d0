"""TorchServe: a Java (Netty) front end and batcher in front of Python worker processes.

Configured as TorchServe's batching guide describes: the model's `batchSize` and `maxBatchDelay`
in config.properties (`models`), and `minWorkers` = `maxWorkers` = one worker process per core on
CPU (one on a GPU), each with its own single-thread session, decoding its own requests. The
delay is 10 ms (the mosec, Ray Serve and LitServe setting here), where the guide's example has
100. The response timeout is 60 s, the bound every other server here gets. The model is packed
by TorchServe's own archiver (`--archive-format no-archive`); this module is its handler.

The request is the service's multipart body, with one change: each image's part has its own
field name (`file0`, `file1`, ...). TorchServe's Python worker keeps one value per field name
(`ts/service.py` builds each request as a dict of name to value), so parts that share a name
would reach the handler as the last image alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.load import multipart_upload
from bench.peers import Peer, results_top1
from bench.peers.common import (
    ServeArgs,
    classifier_from_variables,
    free_port,
    interrupt_on_sigterm,
    model_variables,
    parse_serve_args,
)

MODEL = "vit"
PREDICT_PATH = f"/predictions/{MODEL}"
MAX_BATCH_DELAY_MS = 10
RESPONSE_TIMEOUT_S = 60
REPOSITORY = Path(__file__).resolve().parents[2]  # the archiver copies this file alone: its imports come from here


class Handler:
    """TorchServe's custom-service contract: `initialize(context)`, then `handle(batch, context)`."""

    def initialize(self, context: Any) -> None:
        self.model = classifier_from_variables()

    def handle(self, batch: list[dict[str, bytes]], context: Any) -> list[dict[str, object]]:
        requests = [self.model.decode_all([bytes(form[part_name(i)]) for i in range(len(form))]) for form in batch]
        return self.model.classify_requests(requests)


def part_name(index: int) -> str:
    return f"file{index}"


def request(url: str, images: list[bytes], content_type: str) -> bytes:
    return multipart_upload(url, PREDICT_PATH, images, content_type, [part_name(i) for i in range(len(images))])


def describe(workers: int, max_batch_size: int, device: str) -> str:
    return (
        f"Java front end; {workers} Python worker process(es) on {device}, each 1 session x 1 thread, decoding "
        f"its own requests; batchSize {max_batch_size} requests, maxBatchDelay {MAX_BATCH_DELAY_MS} ms"
    )


PEER = Peer("torchserve", "torchserve", __name__, request, results_top1, describe, batches_requests=True)


def configuration(store: Path, port: int, workers: int, max_batch_size: int) -> str:
    model = {
        "defaultVersion": True,
        "marName": MODEL,
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": max_batch_size,
        "maxBatchDelay": MAX_BATCH_DELAY_MS,
        "responseTimeout": RESPONSE_TIMEOUT_S,
    }
    return "\n".join(
        [
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{free_port()}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            f"model_store={store}",
            f"load_models={MODEL}",
            f"models={json.dumps({MODEL: {'1.0': model}})}",
            "disable_token_authorization=true",
            "metrics_mode=prometheus",
        ]
    )


def main(args: ServeArgs) -> None:
    interrupt_on_sigterm()
    archiver, torchserve = (str(Path(sys.executable).parent / tool) for tool in ("torch-model-archiver", "torchserve"))
    with tempfile.TemporaryDirectory(prefix="vit-torchserve-") as folder:
        work = Path(folder)
        store = work / "store"
        store.mkdir()
        subprocess.run(
            [archiver, "--model-name", MODEL, "--version", "1.0", "--handler", __file__]
            + ["--export-path", str(store), "--archive-format", "no-archive"],
            check=True,
        )
        config = work / "config.properties"
        config.write_text(configuration(store, args.port, args.workers, args.max_batch_size))
        environment = {
            **os.environ,
            **model_variables(args),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
            "LOG_LOCATION": str(work / "logs"),
            "METRICS_LOCATION": str(work / "logs"),
        }
        command = [torchserve, "--start", "--foreground", "--ncs", "--ts-config", str(config)]
        with subprocess.Popen(command, cwd=work, env=environment) as server:
            try:
                server.wait()
            except KeyboardInterrupt:
                subprocess.run([torchserve, "--stop"], cwd=work, env=environment, check=False)
                server.wait()


if __name__ == "__main__":
    main(parse_serve_args(__doc__ or ""))
