from bench.machine import Machine
from bench.raw_limit import Layout
from bench.reproduce import summary_table
from bench.throughput import BenchResult, HttpResult

PEAKS = {"fp32": 50_000.0, "fp16": 600_000.0}
H200 = Machine("AMD EPYC", 16, ["avx512f"], "NVIDIA H200", PEAKS, "CPython 3.12.3 (/usr/bin/python3.12)")


def _result() -> BenchResult:
    http = [
        HttpResult("service", 16, 2_000.0, 8.0, 9.0, 10.0, 6.5, 0.4, 0),
        HttpResult("service", 64, 3_000.0, 21.0, 25.0, 30.0, 31.2, 7.25, 0),
        HttpResult("baseline", 64, 400.0, 160.0, 170.0, 180.0, None, None, 0),
    ]
    return BenchResult(
        "vit-b-fp16", "fp16", 20_000, H200, 17_600_000_000, [Layout(1, 1, 128, 4_000.0)], 4_400.0, 1.5, http, 1, []
    )


def test_the_summary_gives_the_best_levels_batch_and_loop_lag_beside_the_ratios():
    table = summary_table([_result()])
    assert "NVIDIA H200" in table and "; CPython 3.12.3 (/usr/bin/python3.12)." in table
    row = next(line for line in table.splitlines() if line.startswith("| vit-b-fp16"))
    assert "3000.0 img/s (c=64, batch 31.2, lag 7.2 ms)" in row
    assert "| 0.75× |" in row and "| 7.50× |" in row  # service / limit, service / baseline
