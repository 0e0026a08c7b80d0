"""The onnxruntime backend: session workers, the provider check, warm-up and `predict`."""

from __future__ import annotations

import logging
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

from model_export.manifest import FORMAT_VERSION, MANIFEST_METADATA_KEY, Manifest
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


def load_manifest(model_dir: Path) -> Manifest:
    """manifest.json beside the model, or the copy embedded in the ONNX metadata."""
    try:
        return _current(Manifest.read(model_dir), model_dir)
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise StartupError(f"{model_dir}/manifest.json is invalid: {exc}") from exc
    onnx_path = model_dir / "model.onnx"
    if not onnx_path.is_file():
        raise StartupError(f"no manifest.json or model.onnx in {model_dir}")
    meta = ort.InferenceSession(str(onnx_path), providers=[CPU]).get_modelmeta().custom_metadata_map
    if MANIFEST_METADATA_KEY not in meta:
        raise StartupError(
            f"{onnx_path} has no manifest.json beside it and none in its metadata: export it with vit-export"
        )
    return _current(Manifest.from_json(meta[MANIFEST_METADATA_KEY]), model_dir)


def _current(manifest: Manifest, model_dir: Path) -> Manifest:
    if manifest.format_version < FORMAT_VERSION:
        raise StartupError(
            f"{model_dir} was exported by an older vit-export (manifest format {manifest.format_version}, "
            f"float input); re-export it with this version: vit-export CHECKPOINT --out {model_dir}"
        )
    return manifest


class OnnxBackend:
    """N independent sessions of one graph; `predict` borrows a free one, so N batches run side by side."""

    def __init__(
        self,
        onnx_path: Path,
        manifest: Manifest,
        settings: Settings,
        output_names: list[str],
        workers: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.onnx_path = onnx_path
        self.output_names = output_names
        if not self.onnx_path.is_file():
            raise StartupError(f"model file {self.onnx_path} not found")
        available = ort.get_available_providers()
        requested = requested_providers(settings.providers, available)
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
        self._check_io_names(first)
        self.workers = workers or settings.resolved_session_workers(self.on_cuda)
        sessions = [first] + [self._new_session(requested, settings.intra_op_threads) for _ in range(self.workers - 1)]
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for session in sessions:
            self._free.put(session)
        logger.info(
            "%s on %s: %d session(s) x %d thread(s)",
            onnx_path.name,
            active,
            self.workers,
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

    def _check_io_names(self, session: ort.InferenceSession) -> None:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != self.manifest.input_names or not set(self.output_names) <= set(outputs):
            raise StartupError(
                f"{self.onnx_path.name}: graph inputs {inputs} / outputs {outputs} do not match the expected "
                f"{self.manifest.input_names} / {self.output_names}"
            )

    @property
    def provider(self) -> str:
        return self.providers.active

    def predict(self, pixels: np.ndarray, tensors: np.ndarray) -> list[np.ndarray]:
        """Every output (logits first), each (B + B2, ...), for uint8 (B, H, W, C) pixels and
        already-normalised float32 (B2, C, H, W) tensors; blocking, thread-safe."""
        session = self._free.get()
        try:
            return self._run(session, pixels, tensors)
        finally:
            self._free.put(session)

    def _run(self, session: ort.InferenceSession, pixels: np.ndarray, tensors: np.ndarray) -> list[np.ndarray]:
        feeds = dict(zip(self.manifest.input_names, (pixels, tensors), strict=True))
        if not self.on_cuda:
            return session.run(self.output_names, feeds)  # type: ignore[no-any-return]
        # IO binding: one host-to-device copy in, the outputs allocated on the device and
        # copied back once, instead of run()'s extra staging copies.
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()  # type: ignore[no-any-return]

    def warm_up(self, batch_sizes: list[int], pixel_shape: tuple[int, int, int]) -> None:
        """A real forward pass at each batch size, on every session."""
        height, width, channels = pixel_shape
        no_tensors = np.empty((0, channels, height, width), dtype=np.float32)
        sessions = [self._free.get() for _ in range(self.workers)]
        try:
            for session in sessions:
                for size in batch_sizes:
                    pixels = np.zeros((size, *pixel_shape), dtype=np.uint8)
                    logits = self._run(session, pixels, no_tensors)[0]
                    if logits.shape != (size, self.manifest.num_classes) or not np.isfinite(logits).all():
                        raise StartupError(f"warm-up at batch {size} gave {logits.shape} / non-finite logits")
        finally:
            for session in sessions:
                self._free.put(session)


def warm_up_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to the maximum, and the maximum: the arena grows to its largest size here."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) <= max_batch_size]
    return sorted({*sizes, max_batch_size})
