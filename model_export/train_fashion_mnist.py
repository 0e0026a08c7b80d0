"""Trains the embedded default model: the `vit_fashion_mnist` preset on Fashion-MNIST.

Run once by hand (not in CI); it writes the safetensors weights and a JSON training record
after every epoch, so an interrupted run still leaves its latest weights:

    python -m model_export.train_fashion_mnist --out model_export/default_model
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model_export.fashion_mnist import LABELS, MEAN, STD, load_split
from model_export.vit import VisionTransformer, preset


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)
    return (x - MEAN) / STD


def _augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels (zero-padded, i.e. background) and horizontal flip."""
    n, _, h, w = x.shape
    background = (0.0 - MEAN) / STD
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    shifted = shifted.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    shifted[flip] = shifted[flip].flip(-1)
    return shifted


@torch.no_grad()
def evaluate(model: VisionTransformer, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("model_export/default_model"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-from", type=Path, help="continue from this folder's weights (its training record is kept in ours)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    cfg = preset("vit_fashion_mnist")
    model = VisionTransformer(cfg)
    previous = None
    if args.init_from is not None:
        model.load_state_dict(load_file(args.init_from / "weights.safetensors"), strict=True)
        previous = json.loads((args.init_from / "training_record.json").read_text())
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    x, y = _to_tensor(train_x), torch.from_numpy(train_y.astype(np.int64))
    tx, ty = _to_tensor(test_x), torch.from_numpy(test_y.astype(np.int64))

    # Weight decay on matrices only: decaying the prefix tokens, position table, norms and
    # biases towards zero would fight exactly the parameters the ViT needs to keep distinct.
    def decays(name: str, param: torch.Tensor) -> bool:
        return param.ndim >= 2 and not name.endswith("_token") and name != "pos_embed"

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return args.lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    args.out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    started, step = time.time(), 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        running = 0.0
        for i in range(0, len(x), args.batch_size):
            idx = order[i : i + args.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            logits = model(_augment(x[idx], generator))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(idx)
            step += 1
        accuracy = evaluate(model, tx, ty)
        history.append({"epoch": epoch, "train_loss": running / len(x), "test_accuracy": accuracy})
        print(f"epoch {epoch:3d} loss {running / len(x):.4f} test acc {accuracy:.4f} ({time.time() - started:.0f}s)")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "weights.safetensors")
        record = {
            "preset": "vit_fashion_mnist",
            "config": cfg.to_dict(),
            "labels": list(LABELS),
            "normalisation": {"mean": [MEAN], "std": [STD]},
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "init_from")},
            "continued_from": previous,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs_completed": epoch,
            "wall_time_s": round(time.time() - started, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "final_test_accuracy_torch": accuracy,
            "history": history,
        }
        (args.out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
