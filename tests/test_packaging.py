"""The package as pip sees it: one runtime per extra, and the versions pinned for what ships."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO


@pytest.mark.parametrize(("extra", "runtime"), [("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu")])
def test_each_runtime_extra_resolves_to_exactly_one_onnxruntime(tmp_path, extra, runtime):
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--no-deps",
            "--report",
            str(report),
            f"{REPO}[{extra}]",
        ],
        check=True,
        capture_output=True,
    )
    (project,) = json.loads(report.read_text())["install"]
    requires = [Requirement(r) for r in project["metadata"]["requires_dist"]]
    runtimes = {r.name for r in requires if r.name.startswith("onnxruntime")}
    chosen = {r.name for r in runtimes_of(requires) if r.marker and r.marker.evaluate({"extra": extra})}
    assert chosen == {runtime}
    assert runtimes == {"onnxruntime", "onnxruntime-gpu"}  # each behind its own extra, neither in the base
    assert not [r for r in runtimes_of(requires) if r.marker is None]
    assert not [r for r in requires if r.name.startswith("torch") and r.marker is None]


def runtimes_of(requires: list[Requirement]) -> list[Requirement]:
    return [r for r in requires if r.name.startswith("onnxruntime")]


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", REPO / "docker" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_package_each_extra_installs_and_nothing_else():
    # Each extra resolved under the pins: a package added without `make lock` is named, and a pin outside
    # the range of something that requires it makes pip refuse.
    done = subprocess.run([sys.executable, REPO / "docker" / "lock.py", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_tests_run_the_pinned_versions():
    lock = _lock_module()
    pins = lock.read_pins(lock.CONSTRAINTS)
    installed = {}
    for name in pins:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # onnxruntime-gpu, beside onnxruntime
            continue
    assert {"fastapi", "starlette", "uvicorn", "httptools", "onnxruntime", "numpy"} <= installed.keys()
    assert {name: version for name, version in installed.items() if version != pins[name]} == {}
