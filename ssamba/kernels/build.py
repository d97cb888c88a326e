"""Building the wheels (one ``pip wheel`` per package, in parallel or not), reusing earlier ones, installing."""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TextIO

from ssamba.base.errors import KernelBuildError
from ssamba.kernels.packages import Arch, KernelPackage, parse_arch
from ssamba.kernels.setup_patch import GencodeRewrite, count_sources, restrict_gencode, split_jobs
from ssamba.kernels.sources import (
    default_sdist_dir,
    default_wheel_dir,
    extract_sdist,
    fetch_instructions,
    find_sdist,
    sdist_version,
)
from ssamba.kernels.toolchain import preflight, toolchain


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def default_jobs() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def pip_wheel_command(src: Path, out_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--wheel-dir",
        str(out_dir),
        str(src),
    ]


def build_env(pkg: KernelPackage, archs: Sequence[Arch], jobs: int, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env[f"{pkg.env_prefix}_FORCE_BUILD"] = "TRUE"  # never try to download a prebuilt wheel
    env.pop(f"{pkg.env_prefix}_SKIP_CUDA_BUILD", None)  # left over from `pip download` it would build no kernel
    env["MAX_JOBS"] = str(jobs)
    env["TORCH_CUDA_ARCH_LIST"] = ";".join(a.torch_name for a in archs)
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def wheel_info_path(wheel: Path) -> Path:
    return wheel.with_name(wheel.name + ".build.json")


def _wheel_version(path: Path) -> str:
    parts = path.name[: -len(".whl")].split("-")
    return parts[1] if len(parts) >= 2 else ""


def find_reusable_wheel(
    wheel_dir: Path, pkg: KernelPackage, version: str, archs: Sequence[Arch], info: dict
) -> Optional[Path]:
    """A wheel built earlier by this tool for the same version, architectures, torch and Python."""
    if not wheel_dir.is_dir():
        return None
    for whl in sorted(wheel_dir.glob(f"{pkg.dist}-*.whl")):
        meta_path = wheel_info_path(whl)
        if _wheel_version(whl).split("+")[0] != version or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if (
            meta.get("archs") == [a.torch_name for a in archs]
            and meta.get("torch") == info.get("torch")
            and meta.get("python_tag") == info.get("python_tag")
        ):
            return whl
    return None


def wheel_has_extension(wheel: Path, pkg: KernelPackage) -> bool:
    with zipfile.ZipFile(wheel) as zf:
        return any(Path(n).name.startswith(pkg.extension) and n.endswith(".so") for n in zf.namelist())


_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s*(.*)$")
_SOURCE = re.compile(r"(?:^|\s)(\S+\.(?:cu|cpp|cc|cxx|c))(?=\s|$)")


@dataclass
class BuildJob:
    pkg: KernelPackage
    version: str
    src: Path  # extracted source tree with the rewritten setup.py
    work: Path  # this package's scratch folder (pip's --wheel-dir goes inside)
    log_path: Path
    jobs: int
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    header: str = ""  # written at the top of the log (the setup.py rewrite)
    # runtime
    proc: Optional[subprocess.Popen] = None
    reader: Optional[threading.Thread] = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: Optional[int] = None
    step: tuple[int, int] = (0, 0)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    wheel: Optional[Path] = None
    error: str = ""

    @property
    def out_dir(self) -> Path:
        return self.work / "wheel"

    def start(self, events: "queue.Queue") -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        log.write(self.header)
        log.write(
            f"$ cd {self.src}\n$ MAX_JOBS={self.jobs} {self.pkg.env_prefix}_FORCE_BUILD=TRUE "
            f"TORCH_CUDA_ARCH_LIST={self.env.get('TORCH_CUDA_ARCH_LIST', '')} {' '.join(self.cmd)}\n\n"
        )
        log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.src,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )

        def read() -> None:
            try:
                for line in self.proc.stdout:
                    log.write(line)
                    log.flush()
                    self.tail.append(line.rstrip("\n"))
                    m = _STEP.match(line)
                    if m:
                        done, total = int(m.group(1)), int(m.group(2))
                        if (done, total) != self.step:
                            self.step = (done, total)
                            srcs = _SOURCE.findall(m.group(3))
                            what = Path(srcs[-1]).name if srcs else m.group(3)[:80]
                            events.put((self, f"[{done}/{total}] {what}"))
            finally:
                log.close()

        self.reader = threading.Thread(target=read, name=f"build-log-{self.pkg.name}", daemon=True)
        self.reader.start()

    def poll(self) -> bool:
        """True once the process has exited and its output is fully read."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.reader.join()
        self.returncode = self.proc.returncode
        self.seconds = time.monotonic() - self.started
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # pip -> setup.py -> ninja -> nvcc, all in its session
            except ProcessLookupError:
                pass


def _error_lines(lines: Iterable[str], limit: int = 12) -> list[str]:
    """The lines of a build log that say what went wrong: compiler errors first, then the rest."""
    lines = list(lines)
    compiler = re.compile(r"(?:^|\s)(?:\S+:\d+(?::\d+)?:\s*(?:fatal )?error|\S+\(\d+\):\s*error)\b|^\s*FAILED:")
    other = re.compile(r"\berror\b|Traceback|fatal", re.IGNORECASE)
    first = [ln for ln in lines if compiler.search(ln)]
    rest = [ln for ln in lines if other.search(ln) and ln not in first]
    return (first + rest)[:limit]


def run_builds(
    builds: Sequence[BuildJob],
    parallel: bool,
    out: TextIO,
    heartbeat: float = 60.0,
    poll: float = 0.2,
    on_done: Optional[Callable[[BuildJob], None]] = None,
) -> None:
    """Run the pip builds (all at once with ``parallel``), printing progress; fills each job's result.

    ``on_done(job)`` runs as each build succeeds (before its line is printed), e.g. to move the wheel.
    """
    events: "queue.Queue" = queue.Queue()
    pending = list(builds)
    running: list[BuildJob] = []
    t0 = time.monotonic()
    last_beat = t0

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    try:
        while pending or running:
            while pending and (parallel or not running):
                b = pending.pop(0)
                b.start(events)
                running.append(b)
                say(
                    f"[{_fmt_time(time.monotonic() - t0)}] {b.pkg.name} {b.version}: compiling with {b.jobs} jobs "
                    f"(log: {b.log_path})"
                )
            time.sleep(poll)
            while not events.empty():
                b, msg = events.get()
                say(f"[{_fmt_time(time.monotonic() - t0)}] {b.pkg.name} {msg}")
            for b in list(running):
                if not b.poll():
                    continue
                while not events.empty():
                    eb, msg = events.get()
                    say(f"[{_fmt_time(time.monotonic() - t0)}] {eb.pkg.name} {msg}")
                running.remove(b)
                _finish(b)
                if b.wheel is not None and on_done is not None:
                    try:
                        on_done(b)
                    except OSError as e:
                        b.wheel, b.error = None, f"could not store the wheel: {e}"
                stamp = f"[{_fmt_time(time.monotonic() - t0)}]"
                if b.wheel is not None:
                    size = b.wheel.stat().st_size / 2**20
                    say(f"{stamp} {b.pkg.name}: built in {_fmt_time(b.seconds)} -> {b.wheel} ({size:.1f} MiB)")
                else:
                    say(f"{stamp} {b.pkg.name}: FAILED after {_fmt_time(b.seconds)}: {b.error}")
                    say(f"  full log: {b.log_path}")
                    try:
                        errs = _error_lines(b.log_path.read_text(encoding="utf-8", errors="replace").splitlines())
                    except OSError:
                        errs = _error_lines(b.tail)
                    if errs:
                        say("  first error lines:")
                        for ln in errs:
                            say(f"    {ln}")
                    say("  last lines of the log:")
                    for ln in list(b.tail)[-15:]:
                        say(f"    {ln}")
            now = time.monotonic()
            if running and now - last_beat >= heartbeat:
                last_beat = now
                parts = []
                for b in running:
                    done, total = b.step
                    parts.append(f"{b.pkg.name} {done}/{total} files" if total else f"{b.pkg.name} preparing")
                say(f"[{_fmt_time(now - t0)}] still compiling: {', '.join(parts)}")
    except BaseException:
        for b in running:
            b.kill()
        raise


def _finish(b: BuildJob) -> None:
    if b.returncode != 0:
        b.error = f"pip wheel exited with status {b.returncode}"
        return
    wheels = sorted(b.out_dir.glob(f"{b.pkg.dist}-*.whl"))
    if len(wheels) != 1:
        b.error = f"expected one {b.pkg.dist}-*.whl in {b.out_dir}, found {len(wheels)}"
        return
    if not wheel_has_extension(wheels[0], b.pkg):
        b.error = (
            f"the wheel holds no compiled {b.pkg.extension} extension (was "
            f"{b.pkg.env_prefix}_SKIP_CUDA_BUILD set, or CUDA not found by setup.py?)"
        )
        return
    b.wheel = wheels[0]


@dataclass
class Outcome:
    pkg: KernelPackage
    version: str = ""
    status: str = ""  # built | reused | failed
    seconds: float = 0.0
    jobs: int = 0
    wheel: Optional[Path] = None
    detail: str = ""


def cmd_build(args, out: Optional[TextIO] = None) -> int:
    """``build``: reuse or compile a wheel per package, install them, run ``check``; 0 when all succeeded."""
    out = out or sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    t_start = time.monotonic()
    packages = args.packages
    archs = parse_arch(args.arch) if isinstance(args.arch, str) else args.arch
    sdist_dir = Path(args.sdist_dir) if args.sdist_dir else default_sdist_dir()
    wheel_dir = (Path(args.wheel_dir) if args.wheel_dir else default_wheel_dir()).resolve()
    log_dir = (Path(args.log_dir) if args.log_dir else wheel_dir / "logs").resolve()
    jobs = args.jobs or default_jobs()
    info = toolchain()
    say(
        f"kernels for {', '.join(str(a) for a in archs)}: {', '.join(p.name for p in packages)} "
        f"(python {info['python']}, torch {info['torch']}, CUDA {info['torch_cuda']}, nvcc {info['nvcc_version']})"
    )

    outcomes: dict[str, Outcome] = {p.name: Outcome(p) for p in packages}
    to_build: list[tuple[KernelPackage, Path]] = []
    missing: list[KernelPackage] = []
    for pkg in packages:
        sdist = find_sdist(sdist_dir, pkg)
        version = sdist_version(sdist) if sdist else pkg.version
        if not args.force:
            whl = find_reusable_wheel(wheel_dir, pkg, version, archs, info)
            if whl is not None:
                outcomes[pkg.name] = Outcome(pkg, version, "reused", 0.0, 0, whl)
                say(
                    f"{pkg.name} {version}: reusing {whl} (built for the same architecture, torch and Python; "
                    "--force rebuilds)"
                )
                continue
        if sdist is None:
            missing.append(pkg)
            continue
        if version != pkg.version:
            say(f"warning: {pkg.name}: using {sdist.name}, but pyproject pins {pkg.name}=={pkg.version}")
        to_build.append((pkg, sdist))
    if missing:
        raise KernelBuildError(fetch_instructions(missing, sdist_dir))

    builds: list[BuildJob] = []
    workroot: Optional[Path] = None
    if to_build:
        workroot = Path(tempfile.mkdtemp(prefix="ssamba-kernels-"))
        sources: dict[str, str] = {}
        prepared: dict[str, tuple[Path, GencodeRewrite]] = {}
        try:
            for pkg, sdist in to_build:
                src = extract_sdist(sdist, workroot / pkg.name / "src")
                setup_py = src / "setup.py"
                original = setup_py.read_text(encoding="utf-8")
                rw = restrict_gencode(original, archs, f"{sdist.name}/setup.py")
                (src / "setup.py.orig").write_text(original, encoding="utf-8")
                setup_py.write_text(rw.text, encoding="utf-8")
                sources[pkg.name], prepared[pkg.name] = original, (src, rw)
                listed = ", ".join("sm_" + sm for sm in rw.found)
                kept = ", ".join("sm_" + sm for sm in rw.kept)
                say(
                    f"{pkg.name} {sdist_version(sdist)}: setup.py lists {len(rw.found)} architectures ({listed}); "
                    f"building only {kept}"
                )
            for w in preflight(info, archs, sources):
                say(f"warning: {w}")
        except BaseException:
            shutil.rmtree(workroot, ignore_errors=True)
            raise
        if args.parallel and len(to_build) > 1:
            shares = split_jobs(jobs, [count_sources(sources[p.name]) for p, _ in to_build])
        else:
            shares = [jobs] * len(to_build)
        for (pkg, sdist), n in zip(to_build, shares):
            src, rw = prepared[pkg.name]
            version = sdist_version(sdist)
            b = BuildJob(pkg, version, src, workroot / pkg.name, log_dir / f"{pkg.dist}-{version}-build.log", n)
            b.cmd = pip_wheel_command(src, b.out_dir)
            b.env = build_env(pkg, archs, n)
            b.header = f"# ssamba.kernels build of {sdist} for {', '.join(map(str, archs))}\n{rw.diff}\n"
            builds.append(b)
        mode = "at once" if args.parallel and len(builds) > 1 else "one after another"
        say(f"building {len(builds)} package(s) {mode} with {jobs} jobs in all (scratch: {workroot})")

        def store(b: BuildJob) -> None:
            wheel_dir.mkdir(parents=True, exist_ok=True)
            dest = wheel_dir / b.wheel.name
            for old in wheel_dir.glob(f"{b.pkg.dist}-{b.version}-*.whl"):
                old.unlink()
                wheel_info_path(old).unlink(missing_ok=True)
            shutil.move(str(b.wheel), dest)
            wheel_info_path(dest).write_text(
                json.dumps(
                    {
                        "package": b.pkg.name,
                        "version": b.version,
                        "archs": [a.torch_name for a in archs],
                        "torch": info["torch"],
                        "torch_cuda": info["torch_cuda"],
                        "nvcc": info["nvcc_version"],
                        "python_tag": info["python_tag"],
                        "build_seconds": round(b.seconds, 1),
                        "jobs": b.jobs,
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    },
                    indent=2,
                )
                + "\n"
            )
            b.wheel = dest

        run_builds(builds, parallel=args.parallel, out=out, on_done=store)
        for b in builds:
            o = Outcome(b.pkg, b.version, "built" if b.wheel else "failed", b.seconds, b.jobs, b.wheel, b.error)
            outcomes[b.pkg.name] = o

    failed = [o for o in outcomes.values() if o.status == "failed"]
    ready = [o for o in outcomes.values() if o.wheel is not None]
    if workroot is not None:
        if failed:
            say(f"scratch folder kept for inspection: {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)

    installed_ok = True
    if ready and not args.no_install:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--force-reinstall",
            *[str(o.wheel) for o in ready],
        ]
        say(f"installing {', '.join(o.wheel.name for o in ready)}")
        t = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            installed_ok = False
            say(f"pip install FAILED (status {res.returncode}):")
            for ln in (res.stdout + res.stderr).splitlines()[-30:]:
                say(f"    {ln}")
        else:
            say(f"installed in {_fmt_time(time.monotonic() - t)}")

    say("")
    say(f"{'package':<15}{'version':<14}{'arch':<10}{'status':<9}{'jobs':>5}  {'wall':>8}  wheel")
    for o in outcomes.values():
        wheel = f"{o.wheel.name} ({o.wheel.stat().st_size / 2**20:.1f} MiB)" if o.wheel else o.detail
        say(
            f"{o.pkg.name:<15}{o.version:<14}{','.join(str(a) for a in archs):<10}{o.status:<9}"
            f"{o.jobs or '-':>5}  {_fmt_time(o.seconds):>8}  {wheel}"
        )
    say(f"total wall time {_fmt_time(time.monotonic() - t_start)}")

    rc = 0 if not failed and installed_ok else 1
    if ready and not args.no_install and installed_ok:
        say("")
        say(f"$ {Path(sys.executable).name} -m ssamba.kernels check")
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        res = subprocess.run(
            [sys.executable, "-m", "ssamba.kernels", "check", "--packages", ",".join(o.pkg.name for o in ready)],
            env=env,
        )
        rc = rc or res.returncode
    return rc
