"""The cores the service sizes itself by: the affinity, capped by a cgroup CPU quota, read from
cgroup trees laid out as a container or a host shows them."""

import os
from pathlib import Path

import pytest

from service.cores import available_cores, cgroup_cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def _tree(root: Path, memberships: str, files: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(memberships)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("memberships", "files", "quota", "cores"),
    [
        # With a cgroup namespace (Docker's and containerd's default on v2) the container's cgroup is the root.
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5, 1),
        # Without one, the tightest of the process's cgroup and its parents applies.
        (
            "0::/kubepods/pod-a/container-b\n",
            {"kubepods/pod-a/cpu.max": "300000 100000\n", "kubepods/pod-a/container-b/cpu.max": "max 100000\n"},
            3.0,
            min(AFFINITY, 3),
        ),
        # cgroup v1: the cpu controller's own mount; below one core, still one.
        (
            "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            0.5,
            1,
        ),
    ],
    ids=["v2-container-1.5-cpus", "v2-pod-limit-above-the-container", "v1-half-a-cpu"],
)
def test_a_cpu_quota_caps_the_affinity(tmp_path, memberships, files, quota, cores):
    root = _tree(tmp_path, memberships, files)
    assert cgroup_cpu_quota(root) == quota
    assert available_cores(root) == cores


@pytest.mark.parametrize(
    ("memberships", "files"),
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}),
        ("0::/\n", {"cpu.max": "garbage\n"}),
        ("0::/\n", {}),
    ],
    ids=["v2-unlimited", "v1-unlimited", "malformed", "no-controller-file"],
)
def test_no_quota_leaves_the_affinity(tmp_path, memberships, files):
    root = _tree(tmp_path, memberships, files)
    assert cgroup_cpu_quota(root) is None
    assert available_cores(root) == AFFINITY


def test_where_there_is_no_proc_the_affinity_is_all_there_is(tmp_path):
    assert available_cores(tmp_path) == AFFINITY
