"""What `vit-bench peers` found, and the ratios, JSON, Markdown and plot made from it (no I/O but files)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

SERVICE = "service"


@dataclass(frozen=True)
class Gate:
    """Did a server answer the gate images with the service's top-1?"""

    system: str
    images: int
    mismatches: int  # images whose top-1 differs from the service's
    error: str | None = None  # why it gave no usable answer at all (did not start, bad status, ...)

    @property
    def passed(self) -> bool:
        return self.error is None and self.mismatches == 0

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return f"failed: {self.error}"
        if self.mismatches:
            return f"wrong: {self.mismatches} of {self.images} top-1 differ from the service's"
        return f"{self.images}/{self.images} top-1 as the service"


def check_gate(system: str, reference: list[int], answers: list[int]) -> Gate:
    """Compare a server's top-1 per gate image with the service's; a missing answer counts as wrong."""
    mismatches = sum(a != r for a, r in zip(answers, reference, strict=False)) + abs(len(reference) - len(answers))
    return Gate(system, len(reference), mismatches)


@dataclass(frozen=True)
class Level:
    """One server at one concurrency: the figures of a timed window after a settle window."""

    system: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # answers other than 200 (or none) over the whole run of this level
    requests: int  # answered with 200 inside the timed window
    cpu_s: float  # CPU seconds of the server's whole process tree inside the timed window
    round: int = 0  # which of the run's rounds it was timed in

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / max(1, self.requests)


@dataclass(frozen=True)
class Summary:
    """One server at one concurrency over the rounds: the median of each figure, the errors summed."""

    system: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: float


@dataclass(frozen=True)
class System:
    """A server as configured for the run."""

    name: str
    version: str
    configuration: str  # workers, sessions, batching, in words
    gate: Gate | None = None  # None for the service, the reference
    note: str | None = None  # why it was not run at all (not installed)


class Ratio(TypedDict):
    concurrency: int
    service_images_per_s: float
    best_peer: str
    best_peer_images_per_s: float
    service_over_best_peer: float  # the median of per_round
    per_round: list[float]
    rounds_ahead: int  # rounds in which the service served at least as many images/s
    service_p99_ms: float
    best_peer_p99_ms: float


@dataclass
class PeersResult:
    model: str
    variant: str
    device: str  # "cpu" or "cuda"
    machine: dict[str, object]  # cpu, cores, kernel flags, gpu
    onnxruntime: str
    upload: str  # what one image of a request is, in words
    images_per_request: int
    limit_images_per_s: float  # raw onnxruntime in the peers' session layout, no HTTP
    limit_layout: str
    systems: list[System] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    skipped_levels: list[int] = field(default_factory=list)  # a round trip would not fit the window
    rounds: int = 1

    def summary(self, system: str, concurrency: int) -> Summary | None:
        runs = [r for r in self.levels if r.system == system and r.concurrency == concurrency]
        if not runs:
            return None
        return Summary(
            system,
            concurrency,
            statistics.median(r.images_per_s for r in runs),
            statistics.median(r.p50_ms for r in runs),
            statistics.median(r.p99_ms for r in runs),
            sum(r.errors for r in runs),
            statistics.median(r.cpu_ms_per_request for r in runs),
        )

    def concurrencies(self) -> list[int]:
        return sorted({r.concurrency for r in self.levels})

    def ratios(self) -> list[Ratio]:
        """Per concurrency: the service's images/s over the best peer's there (the peer with the
        highest median; peers that passed the gate, a wrong peer has no figures), and the p99s.

        The ratio is taken in each round, between windows timed one after the other, and its
        median is the figure: the machine's drift between rounds cancels, which it does not in a
        ratio of medians."""
        rows: list[Ratio] = []
        for concurrency in self.concurrencies():
            service = self.summary(SERVICE, concurrency)
            peers = [
                summary
                for system in self.systems
                if system.name != SERVICE and (summary := self.summary(system.name, concurrency)) is not None
            ]
            if service is None or not peers:
                continue
            best = max(peers, key=lambda r: r.images_per_s)
            per_round = self._per_round_ratios(best.system, concurrency)
            rows.append(
                Ratio(
                    concurrency=concurrency,
                    service_images_per_s=service.images_per_s,
                    best_peer=best.system,
                    best_peer_images_per_s=best.images_per_s,
                    service_over_best_peer=statistics.median(per_round),
                    per_round=per_round,
                    rounds_ahead=sum(ratio >= 1 for ratio in per_round),
                    service_p99_ms=service.p99_ms,
                    best_peer_p99_ms=best.p99_ms,
                )
            )
        return rows

    def _per_round_ratios(self, peer: str, concurrency: int) -> list[float]:
        at = {(r.system, r.round): r.images_per_s for r in self.levels if r.concurrency == concurrency}
        rounds = sorted({r for (_, r) in at})
        return [at[SERVICE, r] / at[peer, r] for r in rounds if (SERVICE, r) in at and (peer, r) in at]

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        for system, record in zip(self.systems, data["systems"], strict=True):
            record["gate_passed"] = system.gate.passed if system.gate else None
        for level, record in zip(self.levels, data["levels"], strict=True):
            record["cpu_ms_per_request"] = level.cpu_ms_per_request
        data["ratios"] = self.ratios()
        return data

    def markdown(self) -> str:
        machine = self.machine
        gpu = f"; GPU {machine['gpu']}" if machine.get("gpu") else ""
        lines = [
            f"Model {self.model} ({self.variant}) on {self.device}: {machine['cpu']}, {machine['cores']} cores{gpu}; "
            f"onnxruntime {self.onnxruntime}; {machine['python']}.",
            f"Each request: {self.images_per_request} x {self.upload}. Raw onnxruntime in the peers' layout "
            f"({self.limit_layout}), no HTTP: {self.limit_images_per_s:.1f} images/s.",
            self._rounds_words(),
            "",
            "| server | version | configuration | gate |",
            "|---|---|---|---|",
        ]
        for system in self.systems:
            gate = system.note or (system.gate.verdict if system.gate else "the reference")
            lines.append(f"| {system.name} | {system.version} | {system.configuration} | {gate} |")
        figures = f"median of {self.rounds} rounds: " if self.rounds > 1 else ""
        lines += [
            "",
            f"| server | concurrency | {figures}images/s | p50 ms | p99 ms | errors | CPU ms / request |",
            "|---|---|---|---|---|---|---|",
        ]
        for system in self.systems:
            for concurrency in self.concurrencies():
                r = self.summary(system.name, concurrency)
                if r is not None:
                    lines.append(
                        f"| {r.system} | {r.concurrency} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
                        f"{r.errors} | {r.cpu_ms_per_request:.2f} |"
                    )
        paired = self.rounds > 1
        lines += [
            "",
            "| concurrency | service images/s | best peer | its images/s | service / best peer "
            "| p99 ms: service / best peer |" + (" per round | service ahead |" if paired else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if paired else ""),
        ]
        for row in self.ratios():
            line = (
                f"| {row['concurrency']} | {row['service_images_per_s']:.1f} | {row['best_peer']} | "
                f"{row['best_peer_images_per_s']:.1f} | {row['service_over_best_peer']:.2f}x | "
                f"{row['service_p99_ms']:.1f} / {row['best_peer_p99_ms']:.1f} |"
            )
            if paired:
                per_round = row["per_round"]
                line += (
                    f" {min(per_round):.2f}-{max(per_round):.2f}x | {row['rounds_ahead']} of {len(per_round)} rounds |"
                )
            lines.append(line)
        if self.skipped_levels:
            lines += ["", f"Skipped concurrency {self.skipped_levels}: a round trip would exceed half the window."]
        return "\n".join(lines) + "\n"

    def _rounds_words(self) -> str:
        if self.rounds == 1:
            return "One round: each server started, timed at every level and stopped in turn."
        return (
            f"{self.rounds} rounds: in each, each server started, timed at every level and stopped in turn, "
            "the order reversed from one round to the next; the ratios are medians of the rounds' own."
        )


def plot(result: PeersResult, path: Path) -> None:
    """images/s, p99 and CPU per request against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 3, figsize=(15, 4.2))
    figures = (
        ("images / s", lambda r: r.images_per_s),
        ("p99 latency (ms)", lambda r: r.p99_ms),
        ("server CPU ms / request (all its processes)", lambda r: r.cpu_ms_per_request),
    )
    for system in result.systems:
        runs = [s for c in result.concurrencies() if (s := result.summary(system.name, c)) is not None]
        style = {"linewidth": 2.5, "color": "black"} if system.name == SERVICE else {}
        for axes, (_, value) in zip(panels, figures, strict=True):
            if runs:
                axes.plot([r.concurrency for r in runs], [value(r) for r in runs], "o-", label=system.name, **style)
    for axes, (label, _) in zip(panels, figures, strict=True):
        axes.set_xscale("log", base=2)
        axes.set_xticks(result.concurrencies(), [str(c) for c in result.concurrencies()])
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(label)
        axes.legend()
    panels[0].set_ylim(bottom=0)
    panels[1].set_yscale("log")
    panels[2].set_ylim(bottom=0)
    panels[0].set_title(f"{result.model} on {result.device}, {result.images_per_request} image(s) per request")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
