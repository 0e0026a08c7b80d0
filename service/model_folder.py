"""What a model folder holds for the server: its manifest, checked to be one this server can serve."""

from __future__ import annotations

from pathlib import Path

from model_export.manifest import FORMAT_VERSION, MANIFEST_METADATA_KEY, Manifest
from service.errors import StartupError


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
    import onnxruntime as ort  # only here: the supervisor needs no runtime unless the manifest hides in the graph

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
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
