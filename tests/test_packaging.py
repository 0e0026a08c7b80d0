"""The package as pip sees it: one runtime per extra, console scripts, the embedded model included."""

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
