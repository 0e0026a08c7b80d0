"""The engine client against a socket that plays the engine: the messages it sends, and how their
answers reach each request."""

import asyncio
import json
import os
import socket
import time

import numpy as np

from model_export.manifest import Manifest
from service.frontend.decode import Decoder
from service.frontend.engine_client import EngineClient
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.shm_ring import Done, Graph, Kind, Ring, RingLayout, Status, done, kind_of, parse_submit, welcome

REQUESTS = 5


def test_requests_handed_over_in_one_turn_of_the_loop_share_one_submit_and_each_gets_its_own_row():
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    settings = Settings(frontend_processes=1, max_queue_images=8, max_images_per_request=1)
    ring = Ring.create(RingLayout.for_model(manifest, 1, 8, REQUESTS))
    classes = manifest.num_classes
    info = {
        "provider": "CPUExecutionProvider",
        "requested_providers": ["CPUExecutionProvider"],
        "session_workers": 1,
        "intra_op_threads": 1,
        "rows": {"plain": [["logits", [classes]]]},
    }

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        address = f"\0vit-engine-client-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(address)
            listener.listen(1)
            listener.setblocking(False)
            lifecycle = Lifecycle(settings.retry_after_s, lambda: None, lambda _: None)
            decoder = Decoder(manifest.preprocessing, settings.max_image_pixels)
            client = EngineClient(ring, 0, address, settings, decoder, lifecycle, FrontendMetrics())
            connecting = asyncio.create_task(client.start(timeout_s=10))
            engine, _ = await loop.sock_accept(listener)
            with engine:
                assert kind_of(await loop.sock_recv(engine, 1 << 16)) == Kind.HELLO
                await loop.sock_sendall(engine, welcome(json.dumps(info).encode()))
                await connecting

                async def classify(row: np.ndarray) -> np.ndarray:
                    with client.admitted() as admission:
                        answer = await client.run(admission, [row], deadline=time.monotonic() + 10)
                    return answer.rows[0]["logits"]

                # FP32 rows need no decode: every request reaches the engine in the turn it starts in.
                shape = ring.layout.tensor_shape
                requests = [asyncio.create_task(classify(np.full(shape, i, np.float32))) for i in range(REQUESTS)]
                graph, records = parse_submit(await loop.sock_recv(engine, 1 << 16))
                assert graph == Graph.PLAIN and len(records) == REQUESTS

                # Play the engine: each slot's logits are its input's value, then one DONE for all.
                for slot, _ in records:
                    ring.outputs[slot, :classes] = ring.tensors[ring.tensor_index(slot)].flat[0]
                answers = [Done(slot, Status.OK, REQUESTS, 0.0, 0.001) for slot, _ in records]
                await loop.sock_sendall(engine, done(answers))
                logits = await asyncio.gather(*requests)
            await client.close()
        for i, row in enumerate(logits):
            assert row.shape == (classes,) and (row == i).all()

    asyncio.run(scenario())
