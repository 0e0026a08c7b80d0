"""The onnxruntime backend: sessions of one graph, the provider check, warm-up and `predict`."""

from __future__ import annotations

import logging
import math
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import onnxruntime as ort
except ImportError as exc:  # the runtime is an extra: say which one to install
    raise ImportError(
        "onnxruntime is not installed: pip install 'vit-serve[cpu]' (or 'vit-serve[gpu]' for CUDA)"
    ) from exc

from model_export.manifest import Manifest
from service.errors import StartupError
from service.settings import Settings

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class ProviderChoice:
    requested: list[str]  # what we asked onnxruntime for, in priority order
    active: str  # what the session reports it runs on


def requested_providers(setting: str, available: list[str]) -> list[str]:
    if setting == "cpu":
        return [CPU]
    if setting == "cuda" or (setting == "auto" and CUDA in available):
        return [CUDA, CPU]
    return [CPU]


class OnnxBackend:
    """N session workers of one graph; `predict` borrows a free one, so N batches run side by side.

    Each worker has a session of its own, or all share one (VIT_SHARED_SESSION): onnxruntime's
    run is thread-safe, and with one intra-op thread it computes on its caller's thread, so shared
    runs still run at once, on one copy of the weights.

    Every output of the graph is computed and returned, in the graph's order (logits first)."""

    def __init__(self, onnx_path: Path, manifest: Manifest, settings: Settings, workers: int | None = None) -> None:
        self.manifest = manifest
        self.onnx_path = onnx_path
        if not self.onnx_path.is_file():
            raise StartupError(f"model file {self.onnx_path} not found")
        available = ort.get_available_providers()
        requested = requested_providers(settings.providers, available)
        if requested[0] == CUDA and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu's [cuda,cudnn] extras install the CUDA and cuDNN libraries as wheels,
            # in folders the dynamic loader does not search: load them from there first.
            ort.preload_dlls()
        first = self._new_session(requested, settings.intra_op_threads)
        # onnxruntime-gpu without a usable CUDA prints errors and quietly runs on CPU:
        # believe only what the session says it is using.
        active = first.get_providers()[0]
        self.providers = ProviderChoice(requested, active)
        if requested[0] == CUDA and active != CUDA:
            message = f"CUDA was requested but the session runs on {active} (available: {available})"
            if settings.require_requested_provider:
                raise StartupError(message)
            logger.warning(message)
        self.on_cuda = active == CUDA
        # Where runs bind their outputs (IO binding), or None for plain runs: on CUDA only, where
        # it saves the staging copies. The same path binds to "cpu" on any host, as CI tests it.
        self.output_device: str | None = "cuda" if self.on_cuda else None
        self.output_names = self._check_io_names(first)
        self.workers = workers or settings.resolved_session_workers(self.on_cuda)
        shared = settings.resolved_shared_session(onnx_path.stat().st_size)
        others = [
            first if shared else self._new_session(requested, settings.intra_op_threads)
            for _ in range(self.workers - 1)
        ]
        sessions = [first, *others]
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for session in sessions:
            self._free.put(session)
        logger.info(
            "%s on %s: %d worker(s) on %s x %d thread(s)",
            onnx_path.name,
            active,
            self.workers,
            "one shared session" if shared else "a session each",
            settings.intra_op_threads,
        )

    def _new_session(self, providers: list[str], threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            return ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for invalid models
            raise StartupError(f"onnxruntime cannot load {self.onnx_path}: {exc}") from exc

    def _check_io_names(self, session: ort.InferenceSession) -> list[str]:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if (
            inputs != self.manifest.input_names
            or outputs[: len(self.manifest.output_names)] != self.manifest.output_names
        ):
            raise StartupError(
                f"{self.onnx_path.name}: graph inputs {inputs} / outputs {outputs} do not match the manifest's "
                f"{self.manifest.input_names} / {self.manifest.output_names}"
            )
        return outputs

    @property
    def provider(self) -> str:
        return self.providers.active

    def predict(self, pixels: np.ndarray, tensors: np.ndarray) -> list[np.ndarray]:
        """Every output, each (B + B2, ...), for uint8 (B, H, W, C) pixels and already-normalised
        float32 (B2, C, H, W) tensors, pixel rows first; blocking, thread-safe."""
        session = self._free.get()
        try:
            return self._run(session, pixels, tensors)
        finally:
            self._free.put(session)

    def _run(self, session: ort.InferenceSession, pixels: np.ndarray, tensors: np.ndarray) -> list[np.ndarray]:
        feeds = dict(zip(self.manifest.input_names, (pixels, tensors), strict=True))
        return run_session(session, feeds, self.output_names, self.output_device)

    def warm_up(self, batch_sizes: list[int], pixel_shape: tuple[int, int, int]) -> list[tuple[str, tuple[int, ...]]]:
        """A real forward pass at each batch size on each session; returns each output's name and
        per-image shape, checked against the batch and for finite logits."""
        height, width, channels = pixel_shape
        no_tensors = np.empty((0, channels, height, width), dtype=np.float32)
        sessions = [self._free.get() for _ in range(self.workers)]
        try:
            for session in dict.fromkeys(sessions):  # a shared session once
                for size in batch_sizes:
                    outputs = self._run(session, np.zeros((size, *pixel_shape), dtype=np.uint8), no_tensors)
                    logits = outputs[0]
                    if logits.shape != (size, self.manifest.num_classes) or not np.isfinite(logits).all():
                        raise StartupError(f"warm-up at batch {size} gave {logits.shape} / non-finite logits")
        finally:
            for session in sessions:
                self._free.put(session)
        return [(name, tuple(output.shape[1:])) for name, output in zip(self.output_names, outputs, strict=True)]


def run_session(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], output_names: list[str], output_device: str | None
) -> list[np.ndarray]:
    """One forward pass on host arrays, these outputs copied back to the host. With an output
    device, through IO binding: one host-to-device copy in (uint8 pixels: a quarter of float32's
    bytes), the outputs allocated on the device and copied back once, instead of run()'s staging
    copies."""
    if output_device is None:
        return session.run(output_names, feeds)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name in output_names:
        binding.bind_output(name, output_device)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def row_size(rows: list[tuple[str, tuple[int, ...]]]) -> int:
    """float32 values in one image's row of every output."""
    return sum(math.prod(shape) for _, shape in rows)


def warm_up_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to the maximum, and the maximum: the arena grows to its largest size here."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) <= max_batch_size]
    return sorted({*sizes, max_batch_size})
