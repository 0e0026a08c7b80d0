"""The CPU and GPU images, built from scratch and run for real on a private Docker engine (about 5 minutes).

One run of docker/ci/build-and-run.sh builds both on one engine from one base; each test reads its part of
the report. The script stops at the first failure, so a later part's lines are missing when an earlier one
fails, and the failing test shows the script's output.
"""

import subprocess

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def report() -> str:
    # No skip when the engine is missing or refuses to start: the script installs it, and fails loudly.
    result = subprocess.run(
        ["bash", str(REPO / "docker/ci/build-and-run.sh")], capture_output=True, text=True, timeout=1800
    )
    print(result.stdout)
    return f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"


def _expect(report: str, line: str) -> None:
    assert line in report, report[-6000:]


def test_cpu_image_builds_runs_classifies_and_stops_cleanly(report):
    _expect(report, "CPU image: expected 'Trouser', got 'Trouser'")
    _expect(report, "stopped cleanly (exit 0")


def test_gpu_image_finds_every_cuda_library_it_ships(report):
    # Without a GPU the driver's library is the one thing missing, and the loader names the first it misses.
    _expect(report, "CUDA provider: every library found but the driver's (libcuda.so.1)")


def test_gpu_image_refuses_to_start_without_a_gpu_when_cuda_is_required(report):
    _expect(report, "refused to start (exit ")
    _expect(report, "CUDA was requested but the session runs on CPUExecutionProvider")


def test_gpu_image_serves_on_cpu_when_told_to(report):
    _expect(report, "GPU image on CPU: expected 'Trouser', got 'Trouser'")
    # A CPU limit is a cgroup quota: the server sizes itself by it, not by the cores it can see.
    _expect(report, "sized by a 1.5-CPU quota: 1 front-end(s), 1 session(s)")
    _expect(report, "exit status 0\n")
