"""How many torch threads a direct run uses: the cores it may run on, shared with the other runs found.

torch's default thread count ignores whatever else runs on the machine; two fine-tunes side by side at
two threads each on two cores were reported 10-20x slower than at one thread each (issue 15). A direct
run (``python -m ssamba.pretrain`` / ``ssamba.finetune``) chooses its thread count with
:func:`choose_threads` (pure: the decision and its warning) from ``--threads``, else
``$OMP_NUM_THREADS``, else the cores this process may run on (``os.sched_getaffinity``) divided among
this run and the other ssamba runs found on the machine (:func:`other_runs`, read from ``/proc``; none
found where there is no ``/proc``), at most :data:`MAX_DEFAULT_THREADS`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MAX_DEFAULT_THREADS = 16
MODULES = ("ssamba.pretrain", "ssamba.finetune")  # direct runs: `python -m <module>`
_THREADS_ARG = re.compile(r"--threads(?:=(\d+))?$")


@dataclass(frozen=True)
class OtherRun:
    """A training process of this project found on the machine: a direct run or a sweep script."""

    pid: int
    command: str  # its command line, shortened
    threads: int | None  # its --threads when given on its command line, else unknown


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "default"
    available: int  # cores this process may run on
    warning: str | None  # oversubscription, or other runs whose thread counts are unknown


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's count where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def env_threads(environ=None) -> int | None:
    """``$OMP_NUM_THREADS`` when it is a positive integer."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def choose_threads(
    requested: int | None, available: int, others: Sequence[OtherRun] = (), omp: int | None = None
) -> ThreadChoice:
    """The thread count of a run and what to warn about (pure).

    ``requested`` (``--threads``) wins, then ``omp`` (``$OMP_NUM_THREADS``); else ``available`` cores
    shared equally with ``others`` (at least 1, at most :data:`MAX_DEFAULT_THREADS`). Warns when this
    run alone wants more threads than cores, when this run plus the others' known threads (1 each where
    unknown) exceed the cores, and otherwise when other runs whose thread counts are unknown share them.
    """
    if requested is not None:
        n, source = requested, "--threads"
    elif omp is not None:
        n, source = omp, "OMP_NUM_THREADS"
    else:
        n, source = max(1, min(MAX_DEFAULT_THREADS, available // (1 + len(others)))), "default"
    cores = _plural(available, "core")
    slow = "threads that outnumber the cores slow every run down many times over"
    listed = "; ".join(
        f"pid {o.pid} ({o.command}, {_plural(o.threads, 'thread') if o.threads else 'threads unknown'})"
        for o in others[:4]
    ) + (f"; {len(others) - 4} more" if len(others) > 4 else "")
    mine = f"{_plural(n, 'torch thread')} ({source})"
    warning = None
    if n > available:
        warning = f"{mine} but this process may run on {cores} only: {slow}. Fix: --threads {available} or fewer"
    elif others:
        demand = n + sum(o.threads or 1 for o in others)
        if demand > available:
            runs = 1 + len(others)
            fix = (
                f"give each run --threads so that they add up to {available} (e.g. --threads {available // runs})"
                if runs <= available
                else f"run at most {available} at once, with --threads 1 each"
            )
            warning = (
                f"this run's {mine} and {len(others)} other ssamba run(s) want at least {demand} threads on "
                f"{cores}: {slow}. Other runs: {listed}. Fix: {fix}"
            )
        elif any(o.threads is None for o in others):
            warning = (
                f"{len(others)} other ssamba run(s) share the {cores} with this run's {mine}: {listed}. "
                f"Their thread counts are unknown (no --threads on their command lines), and {slow}. "
                f"Fix: give each direct run --threads so that they add up to {available}"
            )
    return ThreadChoice(n, source, available, warning)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def other_runs(proc: str | os.PathLike = "/proc", me: int | None = None) -> list[OtherRun]:
    """The project's training processes on this machine other than ``me`` (this process) and its parents:
    ``python -m ssamba.pretrain|ssamba.finetune`` and sweep scripts (``sweeps/*.py``). A process whose
    parent is one of them (a DataLoader worker) is not counted again. Empty where ``proc`` is missing."""
    root = Path(proc)
    me = os.getpid() if me is None else me
    found: dict[int, tuple[int, list[str]]] = {}  # pid -> (parent pid, argv)
    try:
        entries = [p for p in root.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
        if _is_training(argv):
            found[int(entry.name)] = (ppid, argv)
    mine = {me}
    pid = me
    while pid in found:  # this process's own chain (e.g. a wrapper that execs the run)
        pid = found[pid][0]
        mine.add(pid)
    return [
        OtherRun(pid, _short(argv), _threads_of(argv))
        for pid, (ppid, argv) in sorted(found.items())
        if pid not in mine and ppid not in found
    ]


def _is_training(argv: list[str]) -> bool:
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] in MODULES:
            return True
    return any(Path(a).suffix == ".py" and Path(a).parent.name == "sweeps" for a in argv[1:3])


def _threads_of(argv: list[str]) -> int | None:
    for i, a in enumerate(argv):
        m = _THREADS_ARG.match(a)
        if m and m.group(1):
            return int(m.group(1))
        if m and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return None


def _short(argv: list[str], limit: int = 80) -> str:
    text = " ".join([Path(argv[0]).name, *argv[1:]])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def use_threads(requested: int | None, *, log=print, warn=print) -> ThreadChoice:
    """Choose (:func:`choose_threads`) and apply the thread count of this process: torch's intra-op threads
    and ``$OMP_NUM_THREADS`` (what :mod:`ssamba.train.jobs` and child processes read)."""
    import torch

    choice = choose_threads(requested, available_cores(), other_runs(), env_threads())
    torch.set_num_threads(choice.threads)
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    log(f"torch threads: {choice.threads} ({choice.source}; {choice.available} cores available to this process)")
    if choice.warning:
        warn(f"warning: {choice.warning}")
    return choice
