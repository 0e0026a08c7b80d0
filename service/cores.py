"""How many cores this process may use: its CPU affinity, capped by its cgroup's CPU quota.

A Kubernetes CPU limit, or `docker run --cpus`, is a quota (CFS bandwidth), which the affinity
does not show: a pod limited to 2 CPUs on a 64-core node would otherwise start 8 front-ends, 64
onnxruntime sessions and 64 decode threads in each front-end, and spend its limit throttled. A
fractional quota rounds down, to at least one core, as Go's automaxprocs does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

SYSTEM_ROOT = Path("/")


def available_cores(root: Path = SYSTEM_ROOT) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = SYSTEM_ROOT) -> float | None:
    """CPUs per period that this process's cgroups allow (the smallest); None when none is set."""
    limits = [limit for folder in _cgroup_folders(root) if (limit := _quota_in(folder)) is not None]
    return min(limits, default=None)


def _cgroup_folders(root: Path) -> Iterator[Path]:
    """Where a CPU quota for this process may be: the root of each cgroup mount that has the cpu
    controller (a container's own cgroup, where it has a namespace), then this process's cgroup
    below it and that cgroup's parents, where they are visible."""
    base = root / "sys/fs/cgroup"
    try:
        memberships = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for membership in memberships:
        controllers, _, path = membership.partition(":")[2].partition(":")  # "id:controllers:path"
        if controllers == "":  # cgroup v2: one hierarchy, mounted at the base
            mount = base
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount, e.g. cpu,cpuacct
            mount = base / controllers
        else:
            continue
        yield mount
        parts = PurePosixPath(path).parts[1:]
        for depth in range(len(parts), 0, -1):
            yield mount.joinpath(*parts[:depth])


def _quota_in(folder: Path) -> float | None:
    try:
        if (v2 := folder / "cpu.max").is_file():  # "max 100000" or "150000 100000"
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (v1 := folder / "cpu.cfs_quota_us").is_file():  # -1 when unlimited
            quota_us = int(v1.read_text())
            return None if quota_us < 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):  # unreadable or malformed: as if there were no quota
        return None
    return None
