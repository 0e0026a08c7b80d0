"""vit-bench end to end on the embedded model, briefly: every stage runs, figures are written and sane."""

import json
import subprocess
import sys
from pathlib import Path

from service.settings import DEFAULT_MODEL_DIR

VIT_BENCH = str(Path(sys.executable).parent / "vit-bench")


def _bench(*args: object) -> str:
    result = subprocess.run([VIT_BENCH, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    return result.stdout


def test_run_measures_the_limit_the_service_and_the_baseline(tmp_path):
    out = _bench("run", "--seconds", "0.5", "--concurrency", "1,4", "--images-per-request", "2", "--out", tmp_path)
    result = json.loads((tmp_path / "fashion-mnist-vit.json").read_text())
    assert (tmp_path / "fashion-mnist-vit.png").stat().st_size > 10_000
    assert result["machine"]["peaks"]["fp32"] > 0 and result["machine"]["peaks"]["int8"] > 0
    assert result["machine"]["gpu"] is None and result["limit_device_input"] is None
    assert result["machine"]["python"].endswith(f"({Path(sys.executable).resolve()})")
    assert [(r["system"], r["concurrency"]) for r in result["http"]] == [
        ("service", 1),
        ("service", 4),
        ("baseline", 1),
        ("baseline", 4),
    ]
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in result["http"])
    assert all(r["mean_batch"] >= 1 for r in result["http"] if r["system"] == "service")
    # The front-ends sample their loops 10 times a second each: a half-second window holds samples.
    assert all(0 <= r["mean_loop_lag_ms"] < 500 for r in result["http"] if r["system"] == "service")
    assert all(r["mean_loop_lag_ms"] is None for r in result["http"] if r["system"] == "baseline")
    assert result["images_per_request"] == 2
    ratios = result["ratios"]
    assert ratios["service_over_limit"] > 0 and ratios["service_over_baseline"] > 0
    assert 0 < ratios["limit_over_peak"] < 1.5 and result["lone_ms"] > 0
    for label in ("service / limit", "service / baseline", "overhead at concurrency 1", "GEMM peaks", "lag ms"):
        assert label in out


def test_variants_names_the_fastest_variant_here():
    out = _bench("variants", DEFAULT_MODEL_DIR, "--seconds", "0.3")
    assert f"fastest here: fp32+fused-attention -> vit-serve --model {DEFAULT_MODEL_DIR}" in out
