"""The engine's onnxruntime backend on the default model: its workers running batches at once, on a
session each or on one shared session."""

import threading

import numpy as np
import pytest

from model_export.manifest import Manifest
from service.engine.runtime import OnnxBackend
from service.settings import DEFAULT_MODEL_DIR, Settings

MANIFEST = Manifest.read(DEFAULT_MODEL_DIR)
WORKERS = 4
NO_TENSORS = np.empty((0, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module", params=[True, False], ids=["shared session", "a session each"])
def backend(request: pytest.FixtureRequest) -> OnnxBackend:
    settings = Settings(providers="cpu", shared_session=request.param)
    backend = OnnxBackend(DEFAULT_MODEL_DIR / MANIFEST.onnx_file, MANIFEST, settings, WORKERS)
    backend.warm_up([1, 8], (28, 28, 1))
    return backend


def test_batches_run_at_once_answer_as_each_does_alone(backend, fashion_test_split):
    images, _ = fashion_test_split
    batches = images[:512].reshape(64, 8, 28, 28, 1)
    alone = [backend.predict(batch, NO_TENSORS) for batch in batches]

    at_once: list[list[np.ndarray] | None] = [None] * len(batches)
    start = threading.Barrier(WORKERS)

    def worker(first: int) -> None:
        start.wait()
        for index in range(first, len(batches), WORKERS):
            at_once[index] = backend.predict(batches[index], NO_TENSORS)

    threads = [threading.Thread(target=worker, args=(first,)) for first in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for expected, got in zip(alone, at_once, strict=True):
        assert got is not None
        for name, want, have in zip(backend.output_names, expected, got, strict=True):
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-6, err_msg=name)


def test_warm_up_runs_every_batch_size_and_reports_each_outputs_row(backend):
    assert backend.workers == WORKERS
    rows = backend.warm_up([1, 3, 8], (28, 28, 1))
    assert rows == [("logits", (MANIFEST.num_classes,)), ("embedding", (MANIFEST.config["embed_dim"],))]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_the_io_binding_path_answers_what_a_plain_run_answers(backend, batch):
    """The path a CUDA session takes, bound to the host here: pixel rows and tensor rows, every output."""
    rng = np.random.default_rng(batch)
    pixels = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    tensors = rng.standard_normal((batch // 2, 1, 28, 28), dtype=np.float32)
    assert backend.output_device is None  # plain runs on a CPU session
    plain = backend.predict(pixels, tensors)
    backend.output_device = "cpu"
    try:
        bound = backend.predict(pixels, tensors)
    finally:
        backend.output_device = None
    for name, want, have in zip(backend.output_names, plain, bound, strict=True):
        assert have.shape == want.shape == (batch + batch // 2, *want.shape[1:]), name
        np.testing.assert_array_equal(have, want, err_msg=name)
