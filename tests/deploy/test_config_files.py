"""The deployment files, linted and validated by the tools operators use: hadolint, docker compose, kubectl."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.32.0"  # the kubectl on the build machine is a 1.32 client


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, **kwargs)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/Dockerfile.gpu"])
def test_dockerfiles_are_hadolint_clean(dockerfile):
    result = _run(str(BIN / "hadolint"), dockerfile)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_compose_file_is_valid(tmp_path, profile):
    plugins = tmp_path / "cli-plugins"
    plugins.mkdir()
    (plugins / "docker-compose").symlink_to(BIN / "docker-compose")
    result = _run("docker", "compose", *profile, "config", "-q", env={**os.environ, "DOCKER_CONFIG": str(tmp_path)})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kustomization", ["docker/k8s/base", "docker/k8s/overlays/gpu"])
def test_kubernetes_manifests_validate_strictly(kustomization):
    rendered = _run("kubectl", "kustomize", kustomization)
    assert rendered.returncode == 0, rendered.stderr
    validated = _run(str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "-", input=rendered.stdout)
    report = validated.stdout + validated.stderr
    # It prints WARN (and still exits 0) for removed or deprecated apiVersions: those fail here too.
    assert validated.returncode == 0 and "WARN" not in report and "ERROR" not in report, report
    kinds = {line.split(":", 1)[1].strip() for line in rendered.stdout.splitlines() if line.startswith("kind:")}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"}


def test_the_gpu_overlay_asks_for_a_gpu_and_the_gpu_image():
    rendered = _run("kubectl", "kustomize", "docker/k8s/overlays/gpu").stdout
    assert "nvidia.com/gpu: 1" in rendered and "image: vit-serve:gpu" in rendered
    assert "VIT_REQUIRE_REQUESTED_PROVIDER" in rendered


def test_grace_periods_outlast_the_drain():
    deployment = (REPO / "docker/k8s/base/deployment.yaml").read_text()
    assert "terminationGracePeriodSeconds: 40" in deployment and "sleep: {seconds: 5}" in deployment
    assert '{name: VIT_DRAIN_GRACE_S, value: "25"}' in deployment  # 5 + 25 < 40
    assert "stop_grace_period: 30s" in (REPO / "docker-compose.yml").read_text()
