"""The batcher on its own, driven by a plain batch function (its interface), on a real event loop."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import InferenceFailed, Overloaded
from service.metrics import Metrics

POISON = 255


def _run_batch(images: list[np.ndarray]) -> list[np.ndarray]:
    """Logits = the image's value, one-hot; a batch holding a poisoned image fails as a whole."""
    values = [int(image[0, 0, 0]) for image in images]
    if POISON in values:
        raise RuntimeError("device fell over")
    return [np.eye(256, dtype=np.float32)[values]]


def _image(value: int) -> np.ndarray:
    return np.full((2, 2, 1), value, dtype=np.uint8)


def _batcher(pool, **overrides) -> Batcher:
    options = {"workers": 1, "max_batch_size": 4, "max_wait_s": 0.05, "max_queue_images": 16, "retry_after_s": 1}
    return Batcher(_run_batch, pool, metrics=Metrics(), **{**options, **overrides})


async def _submit(batcher: Batcher, values: list[int]):
    with batcher.admission(len(values)):
        deadline = asyncio.get_running_loop().time() + 5
        return await batcher.submit([_image(v) for v in values], deadline)


def test_results_go_back_by_index_across_batches():
    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool)
            batcher.start()
            first, second = await asyncio.gather(_submit(batcher, [1, 2, 3, 4, 5, 6]), _submit(batcher, [7, 8]))
            await batcher.drain()
        return first, second

    first, second = asyncio.run(scenario())
    assert [int(r.outputs[0].argmax()) for r in first] == [1, 2, 3, 4, 5, 6]
    assert [int(r.outputs[0].argmax()) for r in second] == [7, 8]
    assert all(r.batch_size <= 4 for r in first + second)


def test_a_failed_batch_fails_only_its_own_requests():
    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool, max_batch_size=2, max_wait_s=0.2)
            batcher.start()
            outcomes = await asyncio.gather(
                _submit(batcher, [POISON]), _submit(batcher, [9]), _submit(batcher, [10]), return_exceptions=True
            )
            await batcher.drain()
        return outcomes

    poisoned, neighbour, bystander = asyncio.run(scenario())
    # The poisoned image and the one batched with it fail clearly; the next batch is unaffected.
    assert isinstance(poisoned, InferenceFailed) and "device fell over" in poisoned.message
    assert isinstance(neighbour, InferenceFailed)
    assert int(bystander[0].outputs[0].argmax()) == 10


def test_admission_is_counted_in_images_and_released_after_the_answer():
    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool, max_queue_images=4)
            batcher.start()
            with batcher.admission(3), pytest.raises(Overloaded), batcher.admission(2):
                pass
            assert batcher.admitted_images == 0
            await _submit(batcher, [1, 2, 3, 4])
            await batcher.drain()

    asyncio.run(scenario())
