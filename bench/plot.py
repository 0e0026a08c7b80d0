"""The bench's picture: throughput against p99 latency per configuration, and the ratios."""

from __future__ import annotations

from pathlib import Path

from bench.throughput import BenchResult


def plot_result(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (curve, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for system, colour in (("service", "tab:blue"), ("baseline", "tab:orange")):
        runs = [r for r in result.http if r.system == system]
        curve.plot([r.images_per_s for r in runs], [r.p99_ms for r in runs], "o-", color=colour, label=system)
        for r in runs:
            curve.annotate(f"c={r.concurrency}", (r.images_per_s, r.p99_ms), textcoords="offset points", xytext=(4, 4))
    limit = result.limit[0]
    curve.axvline(limit.images_per_s, color="grey", linestyle="--", label=f"raw ORT limit ({limit.images_per_s:.0f}/s)")
    curve.set_xlabel("images / s")
    curve.set_ylabel("p99 latency (ms)")
    curve.set_yscale("log")
    curve.set_title(f"{result.model}: throughput vs p99 latency")
    curve.legend()
    ratios = result.ratios()
    names = ["service / limit", "service / baseline"]
    values = [ratios["service_over_limit"], ratios["service_over_baseline"]]
    bars.bar(names, values, color=["tab:blue", "tab:green"])
    for index, value in enumerate(values):
        bars.text(index, value, f"{value:.2f}x", ha="center", va="bottom")
    bars.axhline(1.0, color="grey", linewidth=0.8)
    bars.set_title("ratios at saturation")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
