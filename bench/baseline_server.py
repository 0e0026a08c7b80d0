"""The baseline a user would write by hand: FastAPI + PyTorch eager, one image per request, no batching.

It builds the same architecture as an exported model (from its manifest) with random weights:
the speed is the same. Run as `python -m bench.baseline_server --model DIR`; vit-bench starts it.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from model_export.manifest import Manifest
from model_export.vit import VisionTransformer, ViTConfig


def create_baseline_app(model_dir: Path, device: str) -> FastAPI:
    cfg = ViTConfig(**Manifest.read(model_dir).config)  # type: ignore[arg-type]
    model = VisionTransformer(cfg).eval().to(device)
    mode = "L" if cfg.in_chans == 1 else "RGB"
    app = FastAPI()

    @app.post("/classify")
    def classify(file: UploadFile = File(...)) -> dict[str, object]:
        image = Image.open(io.BytesIO(file.file.read())).convert(mode).resize((cfg.img_size, cfg.img_size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = (pixels[None] if mode == "L" else pixels.permute(2, 0, 1))[None].to(device)
        with torch.inference_mode():
            probabilities = model((pixels - 0.5) / 0.5).softmax(-1)[0]
        score, index = probabilities.max(0)
        return {"label": int(index), "score": float(score)}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True, help="an exported model folder (for its architecture)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    args = parser.parse_args()
    uvicorn.run(create_baseline_app(args.model, args.device), host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
