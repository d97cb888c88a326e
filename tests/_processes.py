"""Processes a test started (Ray nodes, drivers, servers): find them and kill exactly those, by pid.

A test marks what it starts with ``MARK=<its folder>`` (or ``RAY_TMPDIR``) in the environment;
Ray starts some agents with a trimmed environment, but as children of its raylet, so descendants
of the marked processes and of the given roots count too. Never ``ray stop`` (it kills every Ray
process of the user on the machine).
"""

from __future__ import annotations

import os
from typing import Iterable

import psutil

MARK = "SSAMBA_TEST_RAY"
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def marked_processes(marker: str, roots: Iterable[psutil.Process] = ()) -> dict[int, psutil.Process]:
    """pid -> process: those whose environment carries ``marker`` (MARK or RAY_TMPDIR), the given roots,
    and all their descendants; never this process."""
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
            if p.pid != os.getpid() and marker in (env.get(MARK), env.get("RAY_TMPDIR")):
                procs[p.pid] = p
        except _GONE:
            pass
    for p in list(procs.values()) + list(roots):
        try:
            procs[p.pid] = p
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except _GONE:
            pass
    procs.pop(os.getpid(), None)
    return procs


def kill_processes(procs: Iterable[psutil.Process]) -> int:
    """SIGKILL each process; the number that were still there."""
    n = 0
    for p in list(procs):
        try:
            p.kill()
            n += 1
        except _GONE:
            pass
    return n


def kill_marked(marker: str, roots: Iterable[psutil.Process] = ()) -> int:
    """Kill what :func:`marked_processes` finds; the number killed."""
    return kill_processes(marked_processes(marker, roots).values())
