"""bench.cpu: CPU time of a whole process tree, children and reaped grandchildren included."""

import subprocess
import sys
import time

from bench.cpu import is_running, process_tree, process_tree_cpu_seconds

# A parent that starts a child burning CPU, then burns some itself; the child's time must count,
# both while it runs and once the parent has reaped it.
BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"
TREE = (
    "import subprocess, sys, time\n"
    f"child = subprocess.Popen([sys.executable, '-c', {BURN.format(seconds=0.4)!r}])\n"
    "print('started', flush=True)\n"
    "child.wait()\n"
    f"{BURN.format(seconds=0.2)}"
    "print('done', flush=True)\n"
    "time.sleep(30)\n"
)


def test_a_tree_counts_its_children_while_they_run_and_after_they_are_reaped():
    with subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True) as root:
        try:
            assert root.stdout is not None and root.stdout.readline() == "started\n"
            before = process_tree_cpu_seconds(root.pid)
            tree = process_tree(root.pid)
            assert tree[0] == root.pid and len(tree) == 2  # the root, then its burning child
            assert root.stdout.readline() == "done\n"
            spent = process_tree_cpu_seconds(root.pid) - before
            # 0.4 s in the child (reaped by now) and 0.2 s in the root, less what passed before `before`.
            assert 0.45 <= spent <= 1.5
            assert process_tree(root.pid) == [root.pid] and is_running(root.pid)
        finally:
            root.kill()
    assert process_tree_cpu_seconds(root.pid) == 0.0 and process_tree(root.pid) == []
    assert not is_running(root.pid)


def test_an_idle_process_costs_next_to_nothing():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # past the interpreter's start-up
        before = process_tree_cpu_seconds(sleeper.pid)
        time.sleep(0.5)
        assert process_tree_cpu_seconds(sleeper.pid) - before <= 0.02
    finally:
        sleeper.kill()
        sleeper.wait()
