"""The GPU bundle (bench/gpu_bundle.sh), packed and unpacked here as a GPU host with no network would."""

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = str(REPO / "bench" / "gpu_bundle.sh")


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_service_imports_from_the_bundle_on_a_python_holding_only_what_it_leaves_to_the_host(tmp_path):
    # The host's own packages stand in for what the bundle leaves out: numpy and protobuf, no more. A
    # package the service imports and the bundle lacks (as FastAPI's opentelemetry-api once was) fails here.
    host = tmp_path / "host"
    _run(sys.executable, "-m", "venv", str(host))
    python = str(host / "bin" / "python")
    _run(python, "-m", "pip", "install", "--quiet", "-c", str(REPO / "constraints.txt"), "numpy", "protobuf")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "PYTHON_VERSION": version, "PYTHON": python}
    _run("bash", SCRIPT, "pack", str(tmp_path / "bundle"), cwd=REPO, env=env)
    _run("bash", SCRIPT, "unpack", str(tmp_path / "bundle"), str(tmp_path / "work"), cwd=REPO, env=env)

    probe = "import onnxruntime, service.frontend.app, service.engine.process, service.supervisor; "
    probe += "print(onnxruntime.get_available_providers())"
    site = tmp_path / "work" / "site"
    done = _run(python, "-c", probe, cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{site}:{REPO}"})
    assert "CUDAExecutionProvider" in done.stdout  # onnxruntime-gpu from the bundle, not a CPU build
