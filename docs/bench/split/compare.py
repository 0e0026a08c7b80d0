"""Before and after the process split, in one run: the single-process design (commit c40d084) and
this checkout, started alternately by the same harness on the same machine.

    git worktree add /tmp/before c40d084
    .venv/bin/python docs/bench/split/compare.py /tmp/before docs/bench/split/compare.json

Each design, twice, alternating: the whole server tree's CPU per request around a trivial graph
(c=1, c=64), the default model's requests/s and CPU per request (c=4, 16, 64), three bursts of 96
clients posting 32 JPEGs each (the server-side milliseconds of each 429, from its access log),
and ViT-Ti/16 and ViT-B/16 with random weights, each exported by its own design's vit-export
(p50 at c=1, and images/s under load). `python -m service.cli` runs from a scratch folder, so
that it imports the design under test."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.burst import burst_rounds
from bench.cli import _photo_jpeg
from bench.cpu import process_tree_cpu_seconds
from bench.host_path import trivial_model
from bench.load import multipart_upload, wire_closed_loop
from bench.server import ServerProcess, run_server

CHECKOUT = Path(__file__).resolve().parents[3]
IMAGE = _photo_jpeg("astronaut", (248, 248))
# name: (vit-export preset, the two concurrency levels measured)
VITS = {"vit-ti": ("vit_tiny_patch16_224", (1, 16)), "vit-b": ("vit_base_patch16_224", (1, 4))}


def export_vit(env: dict[str, str], preset: str, folder: Path) -> Path:
    command = ["-m", "model_export.cli", "--random-init", "--preset", preset, "--no-explain", "--out", str(folder)]
    subprocess.run([sys.executable, *command], env={**os.environ, **env}, cwd=folder.parent, check=True)
    return folder


def load(server: ServerProcess, clients: int, seconds: float = 6.0) -> dict[str, float]:
    request = multipart_upload(server.url, "/classify", [IMAGE])
    wire_closed_loop(server.url, request, max(2, clients), 1.5)
    cpu_before, started = process_tree_cpu_seconds(server.process.pid), time.monotonic()
    outcomes = wire_closed_loop(server.url, request, clients, seconds)
    cpu_after, ended = process_tree_cpu_seconds(server.process.pid), time.monotonic()
    answered = [o.latency_s for o in outcomes if o.status == 200]
    return {
        "req_per_s": len(answered) / (ended - started),
        "p50_ms": statistics.median(answered) * 1000 if answered else float("nan"),
        "cpu_ms_per_req": (cpu_after - cpu_before) / max(1, len(outcomes)) * 1000,
        "errors": len(outcomes) - len(answered),
    }


def bursts(server: ServerProcess) -> list[dict[str, object]]:
    request = multipart_upload(server.url, "/classify", [IMAGE] * 32)
    rounds = burst_rounds(server, request, clients=96, rounds=3, pause_s=2.0)
    return [{"statuses": r.by_status, "refusal_ms_p10_p50_p90": r.refusal_ms} for r in rounds]


def main(before: Path, out: Path, work: Path) -> None:
    os.chdir(work)  # `python -m` puts the current folder first on the path
    old_env: dict[str, str] = {"PYTHONPATH": str(before)}
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("old_trivial.py")), str(work / "trivial-before")],
        env={**os.environ, **old_env},
        check=True,
    )
    designs = {
        "before": (old_env, work / "trivial-before", before / "service" / "default_model"),
        "after": ({}, trivial_model(work / "trivial-after"), CHECKOUT / "service" / "default_model"),
    }
    vits = {
        (name, design): export_vit(env, preset, work / f"{name}-{design}")
        for name, (preset, _) in VITS.items()
        for design, (env, _, _) in designs.items()
    }
    results: dict[str, list[dict[str, object]]] = {name: [] for name in designs}
    for _ in range(2):
        for design, (env, trivial, default) in designs.items():
            figures: dict[str, object] = {}
            with run_server(trivial, env) as server:
                for clients in (1, 64):
                    figures[f"trivial c={clients}"] = load(server, clients)
            with run_server(default, env) as server:
                for clients in (4, 16, 64):
                    figures[f"default c={clients}"] = load(server, clients)
                figures["burst"] = bursts(server)
            for name, (_, levels) in VITS.items():
                with run_server(vits[name, design], env) as server:
                    for clients in levels:
                        figures[f"{name} c={clients}"] = load(server, clients, seconds=10.0)
            print(design, json.dumps(figures), flush=True)
            results[design].append(figures)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="vit-split-") as scratch:
        main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), Path(scratch))
