"""The deployment files, linted and validated by the tools operators use: hadolint, docker compose, kubectl
(kustomize), kubernetes-validate, and the schemas KEDA and KServe publish (docker/ci/validate_manifests.py)."""

import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.conftest import REPO

BIN = Path(sys.executable).parent
CRD_MODELS = BIN.parent / "crd-models"  # `make test` installs the KEDA and KServe models there
KUSTOMIZATIONS = {
    "docker/k8s/base": {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Ingress",
    },
    "docker/k8s/overlays/gpu": {"ConfigMap", "Deployment", "Service", "ScaledObject", "PodDisruptionBudget", "Ingress"},
    "docker/k8s/kserve/base": {"InferenceService"},
    "docker/k8s/kserve/gpu": {"InferenceService"},
}


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, **kwargs)


@functools.cache
def _rendered(kustomization: str) -> str:
    rendered = _run("kubectl", "kustomize", kustomization)
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


def _render(kustomization: str) -> list[dict]:
    """The kustomization's manifests, rendered once per run and parsed afresh each call: callers may change them."""
    return list(yaml.safe_load_all(_rendered(kustomization)))


def _validate(documents: list[dict]) -> subprocess.CompletedProcess[str]:
    return _run(
        sys.executable,
        "docker/ci/validate_manifests.py",
        "--models",
        str(CRD_MODELS),
        "-",
        input=yaml.safe_dump_all(documents),
    )


def _one(documents: list[dict], kind: str) -> dict:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def _env(container: dict) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container["env"]}


def _image_env(dockerfile: str) -> dict[str, str]:
    """The variables a Dockerfile's ENV instructions (KEY=value form) set in its image."""
    lines = (REPO / dockerfile).read_text().replace("\\\n", " ").splitlines()
    words = [word for line in lines if line.startswith("ENV ") for word in shlex.split(line.removeprefix("ENV "))]
    return dict(word.split("=", 1) for word in words)


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


def test_compose_leaves_the_healthcheck_to_each_image():
    """The images' own HEALTHCHECKs apply: /readyz, with a longer start period for CUDA and warm-up to batch 64."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert all("healthcheck" not in service for service in compose["services"].values())
    for dockerfile, start_period in (("Dockerfile", "60s"), ("docker/Dockerfile.gpu", "120s")):
        text = (REPO / dockerfile).read_text()
        assert f"HEALTHCHECK --interval=10s --timeout=3s --start-period={start_period} --retries=3" in text
        assert "urlopen('http://127.0.0.1:8000/readyz', timeout=2)" in text


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kubernetes_manifests_validate_strictly(kustomization):
    documents = _render(kustomization)
    result = _validate(documents)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid: ") == len(documents) and "invalid" not in result.stdout
    assert {document["kind"] for document in documents} == KUSTOMIZATIONS[kustomization]


def _assert_whole_cores_for_the_front_ends(container: dict) -> None:
    """As many cores asked for as allowed, whole ones: a GPU pod's front-ends are sized by its CPU limit."""
    cpu = {kind: container["resources"][kind]["cpu"] for kind in ("requests", "limits")}
    assert cpu["requests"] == cpu["limits"] and cpu["limits"].isdigit() and int(cpu["limits"]) >= 4


def test_the_gpu_overlay_asks_for_a_gpu_and_the_gpu_image():
    deployment = _one(_render("docker/k8s/overlays/gpu"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "vit-serve:gpu" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    _assert_whole_cores_for_the_front_ends(container)
    # The image's batch of 64: nothing in the manifests overrides it (test_no_manifest_overrides_the_images_batch_size).
    assert _env(container)["VIT_REQUIRE_REQUESTED_PROVIDER"] == "true" and "VIT_MAX_BATCH_SIZE" not in _env(container)


def test_the_gpu_overlay_scales_on_images_in_flight_per_pod():
    documents = _render("docker/k8s/overlays/gpu")
    deployment, scaled = _one(documents, "Deployment"), _one(documents, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"] == "vit-serve-gpu"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == 'sum(vit_images_in_flight{pod=~"vit-serve-gpu-[^-]+-[^-]+"})'
    # The CPU HPA is gone: KEDA's own HPA is the only one on the Deployment.
    assert "HorizontalPodAutoscaler" not in {document["kind"] for document in documents}


def test_the_cpu_base_and_the_gpu_overlay_can_share_a_namespace():
    """Neither's Service, Deployment or PDB selects the other's pods (a pod under two PDBs cannot be
    evicted at all), their Ingresses claim different paths, and a lone GPU pod can still be evicted."""
    cpu, gpu = _render("docker/k8s/base"), _render("docker/k8s/overlays/gpu")

    def selectors(documents: list[dict]) -> list[dict]:
        kinds = ("Deployment", "PodDisruptionBudget")
        return [_one(documents, "Service")["spec"]["selector"]] + [
            _one(documents, kind)["spec"]["selector"]["matchLabels"] for kind in kinds
        ]

    def pod_labels(documents: list[dict]) -> dict:
        return _one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]

    for own, other in ((cpu, gpu), (gpu, cpu)):
        for selector in selectors(own):
            assert selector.items() <= pod_labels(own).items()
            assert not selector.items() <= pod_labels(other).items(), selector
    paths = [_one(documents, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["path"] for documents in (cpu, gpu)]
    assert paths[0] != paths[1]
    assert _one(gpu, "ConfigMap")["data"]["VIT_ROOT_PATH"] == "/vit-gpu" and paths[1].startswith("/vit-gpu(")
    assert _one(gpu, "ScaledObject")["spec"]["minReplicaCount"] == 1
    budget = _one(gpu, "PodDisruptionBudget")["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": selectors(gpu)[0]}}


def test_the_gateway_closes_idle_connections_before_the_service_does():
    """nginx's idle timeout for its pooled upstream connections is below the service's keep-alive:
    the other way round, a POST sent down a connection the service was just closing gets a 502."""
    gateway = re.search(r"keepalive_timeout (\d+)s;", (REPO / "docker/nginx/vit.conf").read_text())
    assert gateway and int(gateway[1]) < Settings().keep_alive_s


@pytest.mark.parametrize(
    ("kustomization", "image"), [("docker/k8s/kserve/base", "cpu"), ("docker/k8s/kserve/gpu", "gpu")]
)
def test_the_kserve_examples_run_the_image_as_a_v2_custom_predictor_with_its_probes(kustomization, image):
    service = _one(_render(kustomization), "InferenceService")
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"] == f"vit-serve:{image}"
    assert container["ports"] == [{"name": "http1", "containerPort": 8000, "protocol": "TCP"}]
    assert _env(container)["PROTOCOL"] == "v2"
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {
        "startupProbe": {"path": "/startupz", "port": 8000},
        "readinessProbe": {"path": "/readyz", "port": 8000},
        "livenessProbe": {"path": "/livez", "port": 8000},
    }
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    if image == "gpu":
        assert service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
        (metric,) = predictor["autoScaling"]["metrics"]
        assert metric["external"]["metric"]["query"] == 'sum(vit_images_in_flight{pod=~"vit-serve-gpu-predictor-.+"})'
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "VIT_MAX_BATCH_SIZE" not in _env(container)
        _assert_whole_cores_for_the_front_ends(container)


def test_the_gpu_image_batches_64_and_the_cpu_image_the_default_8():
    assert _image_env("docker/Dockerfile.gpu")["VIT_MAX_BATCH_SIZE"] == "64"
    assert "VIT_MAX_BATCH_SIZE" not in _image_env("Dockerfile") and Settings.model_fields["max_batch_size"].default == 8


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_manifest_overrides_the_images_batch_size(kustomization):
    """So each pod batches as its image says: 8 on CPU, 64 on the GPU image (the test above)."""
    documents = _render(kustomization)
    pods = [d["spec"]["template"]["spec"] for d in documents if d["kind"] == "Deployment"]
    pods += [d["spec"]["predictor"] for d in documents if d["kind"] == "InferenceService"]
    ((container,),) = [pod["containers"] for pod in pods]
    assert "VIT_MAX_BATCH_SIZE" not in _env(container)
    # Nor through a ConfigMap the container reads all of.
    sources = {source["configMapRef"]["name"] for source in container.get("envFrom", [])}
    assert sources == {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
    assert all("VIT_MAX_BATCH_SIZE" not in d["data"] for d in documents if d["kind"] == "ConfigMap")


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(document: dict) -> None:
        *parents, last = (part.replace("~1", "/") for part in path.split("/"))  # JSON pointer's escape
        for part in parents:
            document = document[int(part) if part.isdigit() else part]
        if value is _DELETE:
            del document[last]
        else:
            document[int(last) if last.isdigit() else last] = value

    return mutate


_DELETE = object()
# Each a manifest of this repository with one mistake, and the words the validator must name it with.
BROKEN = {
    "keda-misspelt-field": (
        "docker/k8s/overlays/gpu",
        "ScaledObject",
        _set("spec/minReplicas", 1),
        "spec.minReplicas: unknown field",
    ),
    "keda-threshold-number": (
        "docker/k8s/overlays/gpu",
        "ScaledObject",
        _set("spec/triggers/0/metadata/threshold", 128),
        "spec.triggers.0.metadata.threshold: Input should be a valid string",
    ),
    "keda-replicas-text": (
        "docker/k8s/overlays/gpu",
        "ScaledObject",
        _set("spec/maxReplicaCount", "4"),
        "spec.maxReplicaCount: Input should be a valid integer",
    ),
    "keda-no-triggers": (
        "docker/k8s/overlays/gpu",
        "ScaledObject",
        _set("spec/triggers", _DELETE),
        "spec.triggers: Field required",
    ),
    "kserve-misspelt-field": (
        "docker/k8s/kserve/base",
        "InferenceService",
        _set("spec/predictor/minReplica", 1),
        "spec.predictor.minReplica: unknown field",
    ),
    "kserve-scale-target-text": (
        "docker/k8s/kserve/base",
        "InferenceService",
        _set("spec/predictor/scaleTarget", "70"),
        "spec.predictor.scaleTarget: should be int",
    ),
    "kserve-annotation-bool": (
        "docker/k8s/kserve/base",
        "InferenceService",
        _set("spec/predictor/annotations/prometheus.io~1scrape", True),
        "spec.predictor.annotations.prometheus.io/scrape: should be str",
    ),
    "kserve-metric-untyped": (
        "docker/k8s/kserve/gpu",
        "InferenceService",
        _set("spec/predictor/autoScaling/metrics/0/type", _DELETE),
        "spec.predictor.autoScaling.metrics[0]: Invalid value for `type`, must not be `None`",
    ),
    "kserve-metric-target-misspelt": (
        "docker/k8s/kserve/gpu",
        "InferenceService",
        _set("spec/predictor/autoScaling/metrics/0/external/target/averagevalue", "1"),
        "external.target.averagevalue: unknown field",
    ),
    "kserve-container-unnamed": (
        "docker/k8s/kserve/base",
        "InferenceService",
        _set("spec/predictor/containers/0/name", _DELETE),
        "spec.predictor.containers[0]: 'name' is a required property",
    ),
    "kserve-container-misspelt": (
        "docker/k8s/kserve/base",
        "InferenceService",
        _set("spec/predictor/containers/0/readinessProbes", {}),
        "'readinessProbes' was unexpected",
    ),
    "kserve-port-text": (
        "docker/k8s/kserve/base",
        "InferenceService",
        _set("spec/predictor/containers/0/ports/0/containerPort", "8000"),
        "spec.predictor.containers[0].ports.0.containerPort: '8000' is not of type",
    ),
    "kubernetes-removed-api": (
        "docker/k8s/base",
        "HorizontalPodAutoscaler",
        _set("apiVersion", "autoscaling/v2beta2"),
        "Couldn't find schema for kind HorizontalPodAutoscaler",
    ),
    "kubernetes-misspelt-field": ("docker/k8s/base", "Deployment", _set("spec/replica", 2), "'replica' was unexpected"),
}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str]:
    """One validator run over every broken manifest (each named after its case); its line for each."""
    documents = []
    for name, (kustomization, kind, mutate, _) in BROKEN.items():
        document = _one(_render(kustomization), kind)
        mutate(document)
        document["metadata"]["name"] = name
        documents.append(document)
    result = _validate(documents)
    assert result.returncode == 1, result.stdout + result.stderr
    return {line.split("/", 1)[1].split(":", 1)[0]: line for line in result.stdout.splitlines()}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_manifest_is_rejected_with_its_mistake_named(verdicts, case):
    assert verdicts[case].startswith("invalid: ") and BROKEN[case][3] in verdicts[case], verdicts[case]


def test_grace_periods_outlast_the_drain():
    deployment = (REPO / "docker/k8s/base/deployment.yaml").read_text()
    assert "terminationGracePeriodSeconds: 40" in deployment and "sleep: {seconds: 5}" in deployment
    assert '{name: VIT_DRAIN_GRACE_S, value: "25"}' in deployment  # 5 + 25 < 40
    predictor = _one(_render("docker/k8s/kserve/base"), "InferenceService")["spec"]["predictor"]
    assert (
        predictor["terminationGracePeriodSeconds"] == 40
        and _env(predictor["containers"][0])["VIT_DRAIN_GRACE_S"] == "25"
    )
    assert "stop_grace_period: 30s" in (REPO / "docker-compose.yml").read_text()
