"""Shared by the benchmarks: run a command and sample the RSS of its whole process tree."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Ray workers included)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(cmd: list[str], *, cwd, env: dict | None = None) -> tuple[int, str, float, int]:
    """(returncode, output, wall seconds, peak tree RSS bytes) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    return proc.returncode, out, wall, peak[0]
