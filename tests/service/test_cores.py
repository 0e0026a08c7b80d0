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


def test_a_container_limited_to_one_and_a_half_cpus_on_cgroup_v2_gets_one_core(tmp_path):
    # With a cgroup namespace (Docker's and containerd's default on v2) the container's cgroup is the root.
    root = _tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(root) == 1.5
    assert available_cores(root) == 1


def test_without_a_namespace_the_tightest_of_the_cgroup_and_its_parents_applies(tmp_path):
    root = _tree(
        tmp_path,
        "0::/kubepods/pod-a/container-b\n",
        {"kubepods/pod-a/cpu.max": "300000 100000\n", "kubepods/pod-a/container-b/cpu.max": "max 100000\n"},
    )
    assert cgroup_cpu_quota(root) == 3.0
    assert available_cores(root) == min(AFFINITY, 3)


def test_cgroup_v1_quota_is_read_from_the_cpu_controllers_mount(tmp_path):
    root = _tree(
        tmp_path,
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_quota(root) == 0.5
    assert available_cores(root) == 1  # at least one, whatever the quota


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
