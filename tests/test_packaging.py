"""The package as pip sees it: one runtime per extra, console scripts, the embedded model included."""

import json
import subprocess
import sys

import pytest

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
    requires = project["metadata"]["requires_dist"]
    runtimes = {r.split(">")[0].split(";")[0].strip() for r in requires if r.startswith("onnxruntime")}
    chosen = {r.split(">")[0].strip() for r in requires if r.startswith("onnxruntime") and f'extra == "{extra}"' in r}
    assert chosen == {runtime}
    assert runtimes == {"onnxruntime", "onnxruntime-gpu"}  # each behind its own extra, neither in the base
    assert not [r for r in requires if r.startswith("onnxruntime") and "extra" not in r]
    assert not [r for r in requires if r.startswith("torch") and "extra" not in r]
