"""CPU time of a server and every process it started, from /proc (Linux).

A server may be one process or many (workers, a Rust or C++ front end, Ray's raylet and GCS), so
its cost is the time of its whole process tree: sample before and after a window, subtract.

What the samples miss: a process that exits during the window takes its own time with it, unless
a process still in the tree waits for it (reaps it); the kernel then adds the time to the reaper's
cutime/cstime, which are counted here too. Lost are the processes that leave the tree before they
exit (daemonised, or orphaned to init) and children that nobody waits for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    ticks: int  # utime + stime of the process (all its threads) + cutime + cstime of the children it reaped


def _read_stat(path: Path) -> ProcStat | None:
    try:
        text = path.read_text()
    except OSError:  # exited between the listing and the read
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14-17.
    return ProcStat(int(path.parent.name), int(fields[1]), sum(int(f) for f in fields[11:15]))


def _all_stats() -> dict[int, ProcStat]:
    stats = (_read_stat(entry / "stat") for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return {stat.pid: stat for stat in stats if stat is not None}


def process_tree(pid: int) -> list[int]:
    """`pid` and all its living descendants, parents before children; [] when `pid` is gone."""
    return [stat.pid for stat in _tree(pid, _all_stats())]


def _tree(pid: int, stats: dict[int, ProcStat]) -> list[ProcStat]:
    if pid not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    tree, index = [stats[pid]], 0
    while index < len(tree):
        tree.extend(stats[child] for child in children.get(tree[index].pid, ()))
        index += 1
    return tree


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every living descendant so far, with the time of the
    children they reaped; 0.0 when `pid` is gone."""
    return sum(stat.ticks for stat in _tree(pid, _all_stats())) / CLOCK_TICKS
