"""The CPU image, built from scratch and run for real on a private Docker engine (about 3 minutes)."""

import subprocess

from tests.conftest import REPO


def test_image_builds_runs_classifies_and_stops_cleanly():
    # No skip when the engine is missing or refuses to start: the script installs it, and fails loudly.
    result = subprocess.run(
        ["bash", str(REPO / "docker/ci/build-and-run.sh")], capture_output=True, text=True, timeout=1200
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "expected 'Trouser', got 'Trouser'" in result.stdout
    assert "stopped cleanly (exit 0" in result.stdout
