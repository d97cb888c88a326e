"""Build and check the optional CUDA kernels (mamba-ssm, causal-conv1d) for the local GPU.

::

    python -m ssamba.kernels build [--sdist-dir DIR] [--packages mamba-ssm,causal-conv1d]
                                   [--arch auto|9.0[,8.0]] [--jobs N] [--wheel-dir DIR] [--log-dir DIR]
                                   [--no-install] [--parallel] [--force]
    python -m ssamba.kernels check [--packages mamba-ssm,causal-conv1d]

Both packages ship only as source distributions, and their ``setup.py`` hard-codes about nine GPU
architectures (``cc_flag.append("-gencode")`` / ``cc_flag.append("arch=compute_XY,code=sm_XY")`` pairs,
some behind ``if bare_metal_version >= Version(...)``) and ignores ``TORCH_CUDA_ARCH_LIST``. ``build``
extracts each sdist into a temporary folder, rewrites that copy of ``setup.py`` so that only the local
GPU's architecture is compiled (:func:`restrict_gencode`: every recognised ``-gencode`` statement becomes
``pass`` and one ``cc_flag += ["-gencode", "arch=compute_XY,code=sm_XY"]`` goes right after
``cc_flag = []``; anything it does not recognise is an error, never a silent all-architecture build),
runs ``pip wheel --no-deps --no-build-isolation --no-index`` with ``<PREFIX>_FORCE_BUILD=TRUE`` and
``MAX_JOBS``, installs the wheels with ``pip install --no-deps --no-index`` and runs ``check``.

Wheels land in ``--wheel-dir`` next to a ``<wheel>.build.json`` that records the architecture, torch and
Python they were built for; a later ``build`` reuses such a wheel instead of compiling (``--force``
rebuilds), so wheels carried to a fresh machine install in seconds.

``check`` imports both extensions, runs a tiny ``selective_scan_fn`` / ``causal_conv1d_fn`` call on the GPU
against the pure-PyTorch reference (forward and gradients), and says whether
``ssamba.model.kernels.resolve_backend('auto')`` picks ``cuda``.
"""

from __future__ import annotations

import argparse
import ast
import collections
import difflib
import importlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TextIO

from ssamba.errors import KernelBuildError, SSAMBAError  # noqa: F401 - KernelBuildError re-exported

# --------------------------------------------------------------------------------------------------
# the two packages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPackage:
    name: str  # pip name
    dist: str  # file-name / import prefix
    version: str  # the version pinned by pyproject's `cuda` extra
    env_prefix: str  # <PREFIX>_FORCE_BUILD / <PREFIX>_SKIP_CUDA_BUILD
    extension: str  # the compiled module inside the wheel


PACKAGES: dict[str, KernelPackage] = {
    "mamba-ssm": KernelPackage("mamba-ssm", "mamba_ssm", "2.3.2.post1", "MAMBA", "selective_scan_cuda"),
    "causal-conv1d": KernelPackage("causal-conv1d", "causal_conv1d", "1.7.0", "CAUSAL_CONV1D", "causal_conv1d_cuda"),
}
SDIST_SUFFIXES = (".tar.gz", ".tgz", ".zip")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_packages(text: str) -> list[KernelPackage]:
    """``"mamba-ssm,causal-conv1d"`` (either spelling, any order, no repeats) -> packages in build order."""
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    if not wanted:
        raise ValueError(f"no package named; choose from {', '.join(PACKAGES)}")
    by_canon = {_canon(p.name): p for p in PACKAGES.values()}
    by_canon.update({_canon(p.dist): p for p in PACKAGES.values()})
    chosen = []
    for w in wanted:
        pkg = by_canon.get(_canon(w))
        if pkg is None:
            raise ValueError(f"unknown package {w!r}; choose from {', '.join(PACKAGES)}")
        if pkg in chosen:
            raise ValueError(f"package {pkg.name} named twice")
        chosen.append(pkg)
    return [p for p in PACKAGES.values() if p in chosen]


# --------------------------------------------------------------------------------------------------
# GPU architectures
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Arch:
    """A CUDA compute capability, e.g. ``Arch(9, 0)`` (H100/H200); ``suffix`` ``a``/``f`` for sm_90a etc."""

    major: int
    minor: int
    suffix: str = ""

    @property
    def sm(self) -> str:
        return f"{self.major}{self.minor}{self.suffix}"

    @property
    def gencode(self) -> str:
        return f"arch=compute_{self.sm},code=sm_{self.sm}"

    @property
    def torch_name(self) -> str:  # TORCH_CUDA_ARCH_LIST spelling
        return f"{self.major}.{self.minor}{self.suffix}"

    def __str__(self) -> str:
        return f"sm_{self.sm}"


_ARCH_DOTTED = re.compile(r"^(?:sm_|compute_)?(\d{1,2})\.(\d)([af]?)$")
_ARCH_PLAIN = re.compile(r"^(?:sm_|compute_)?(\d{2,3})([af]?)$")


def parse_arch(text: str, detect: Optional[Callable[[], list[Arch]]] = None) -> list[Arch]:
    """``auto`` (the visible GPUs, via ``detect``) or a comma list of ``9.0`` / ``90`` / ``sm_90`` / ``9.0a``."""
    text = text.strip()
    if text.lower() == "auto":
        return (detect or detect_archs)()
    archs: list[Arch] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            raise ValueError(f"empty architecture in {text!r}")
        if item == "auto":
            raise ValueError("'auto' cannot be combined with explicit architectures")
        m = _ARCH_DOTTED.match(item)
        if m:
            arch = Arch(int(m.group(1)), int(m.group(2)), m.group(3))
        else:
            m = _ARCH_PLAIN.match(item)
            if not m:
                raise ValueError(
                    f"cannot read GPU architecture {item!r}: use the compute capability, e.g. 9.0 (H100/H200), "
                    "8.0 (A100), 8.9 (L40), or 90 / sm_90"
                )
            digits = m.group(1)
            arch = Arch(int(digits[:-1]), int(digits[-1]), m.group(2))
        if arch.major < 3:
            raise ValueError(f"GPU architecture {item!r} is not a CUDA compute capability (major >= 3)")
        if arch not in archs:
            archs.append(arch)
    return sorted(archs)


def detect_archs() -> list[Arch]:
    """Compute capabilities of the visible GPUs (``torch.cuda.get_device_capability``)."""
    import torch

    if not torch.cuda.is_available():
        raise KernelBuildError(
            "no CUDA GPU is visible (torch.cuda.is_available() is False), so the local GPU architecture is "
            "unknown. Run this on the GPU machine, or name the architecture: --arch 9.0 (H100/H200)."
        )
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(Arch(major, minor) for major, minor in caps)


# --------------------------------------------------------------------------------------------------
# sdists
# --------------------------------------------------------------------------------------------------


def default_sdist_dir() -> Path:
    return Path(os.environ.get("SSAMBA_SDISTS") or "carry/sdists")


def default_wheel_dir() -> Path:
    return Path(os.environ.get("SSAMBA_WHEELS") or "carry/wheels")


def fetch_instructions(missing: Sequence[KernelPackage], sdist_dir: Path) -> str:
    """What to run on a machine with internet access to get the sdists ``build`` needs."""
    d = sdist_dir.resolve()
    looked = "; ".join(f"{p.name} {p.version} ({p.dist}-*.tar.gz)" for p in missing)
    specs = " ".join(f"{p.name}=={p.version}" for p in PACKAGES.values())
    skip = " ".join(f"{p.env_prefix}_SKIP_CUDA_BUILD=TRUE" for p in PACKAGES.values())
    return (
        f"no source distribution in {d} for: {looked}.\n"
        "mamba-ssm and causal-conv1d ship only as sdists. On a machine with internet access and torch installed "
        "(their setup.py imports torch), download them with\n\n"
        f"    {skip} \\\n"
        f"      python -m pip download --no-deps --no-binary :all: --no-build-isolation -d {d} {specs}\n\n"
        "(the *_SKIP_CUDA_BUILD variables stop setup.py from compiling while pip reads the metadata), copy that "
        "folder to this machine, and pass --sdist-dir DIR or set SSAMBA_SDISTS=DIR."
    )


def _version_key(v: str):
    try:
        from packaging.version import Version

        return (0, Version(v))
    except Exception:
        return (1, v)


def find_sdist(sdist_dir: Path, pkg: KernelPackage) -> Optional[Path]:
    """The sdist of ``pkg`` in ``sdist_dir``: the pinned version if present, else the newest (or None)."""
    found: list[tuple[str, Path]] = []
    if sdist_dir.is_dir():
        for p in sorted(sdist_dir.iterdir()):
            if not p.is_file():
                continue
            for suf in SDIST_SUFFIXES:
                if p.name.endswith(suf):
                    name, sep, version = p.name[: -len(suf)].rpartition("-")
                    if sep and _canon(name) == _canon(pkg.name):
                        found.append((version, p))
                    break
    if not found:
        return None
    for version, p in found:
        if version == pkg.version:
            return p
    try:
        return max(found, key=lambda vp: _version_key(vp[0]))[1]
    except TypeError:
        return sorted(found)[-1][1]


def sdist_version(path: Path) -> str:
    for suf in SDIST_SUFFIXES:
        if path.name.endswith(suf):
            return path.name[: -len(suf)].rpartition("-")[2]
    return ""


def extract_sdist(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` (refusing paths that leave it); returns the folder holding setup.py."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def safe(name: str) -> None:
        target = (root / name).resolve()
        if target != root and root not in target.parents:
            raise KernelBuildError(f"{archive}: member {name!r} would be written outside {dest}; not a usable sdist")

    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for n in zf.namelist():
                safe(n)
            zf.extractall(dest)
    else:
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError as e:
            raise KernelBuildError(f"{archive}: not a readable tar archive ({e}); download the sdist again") from e
        with tf:
            for m in tf.getmembers():
                safe(m.name)
                if m.issym() or m.islnk():
                    raise KernelBuildError(f"{archive}: member {m.name!r} is a link; not a usable sdist")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(dest)
    if (dest / "setup.py").is_file():
        return dest
    roots = [p for p in dest.iterdir() if (p / "setup.py").is_file()]
    if len(roots) != 1:
        raise KernelBuildError(f"{archive}: expected one top-level folder with a setup.py, found {len(roots)}")
    return roots[0]


# --------------------------------------------------------------------------------------------------
# setup.py: keep only the local architecture
# --------------------------------------------------------------------------------------------------

GENCODE_FLAGS = ("-gencode", "--generate-code")
_ARCH_SPEC = r"(?:sm|compute|lto)_\d+[af]?"
_GENCODE_VALUE = re.compile(rf"^arch=compute_(\d+[af]?),code=\[?({_ARCH_SPEC}(?:,{_ARCH_SPEC})*)\]?$")
_GENCODE_JOINED = re.compile(r"^(?:-gencode|--generate-code)[= ](arch=.*)$")
_SUSPICIOUS = re.compile(r"arch=compute_|code=sm_|-gencode|--generate-code|--gpu-architecture|^-arch[= ]")
_MARK = "# ssamba.kernels:"


@dataclass
class GencodeRewrite:
    text: str  # the new setup.py
    found: list[str]  # the sm values the original listed, in source order ("75", "80", ...)
    kept: list[str]  # what the new one builds ("90")
    target: str  # the list variable ("cc_flag")
    removed_lines: list[int]  # 1-based lines of the removed statements in the original
    inserted_after: int  # 1-based line of the `target = []` the new statement follows
    diff: str


def _classify(value: str) -> tuple[str, Optional[str]]:
    """A string constant -> ("flag", None) | ("value", sm) | ("both", sm) | ("other", None)."""
    if value in GENCODE_FLAGS:
        return "flag", None
    m = _GENCODE_VALUE.match(value)
    if m:
        return "value", m.group(1)
    m = _GENCODE_JOINED.match(value)
    if m:
        m2 = _GENCODE_VALUE.match(m.group(1))
        if m2:
            return "both", m2.group(1)
    return "other", None


def _str_elements(node: ast.AST) -> Optional[list[str]]:
    """The strings of a list/tuple literal (or a lone string), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]
    return None


def _gencode_statement(stmt: ast.stmt) -> Optional[tuple[str, list[str]]]:
    """``T.append("-gencode")``, ``T.append("arch=...")``, ``T.extend([...])``, ``T += [...]`` made only of
    -gencode strings -> (T, strings); any other statement -> None."""
    target = strings = None
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        call = stmt.value
        if (isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
                and len(call.args) == 1 and not call.keywords):
            if call.func.attr == "append" and isinstance(call.args[0], ast.Constant):
                target, strings = call.func.value.id, _str_elements(call.args[0])
            elif call.func.attr == "extend" and isinstance(call.args[0], (ast.List, ast.Tuple)):
                target, strings = call.func.value.id, _str_elements(call.args[0])
    elif (isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add) and isinstance(stmt.target, ast.Name)
          and isinstance(stmt.value, (ast.List, ast.Tuple))):
        target, strings = stmt.target.id, _str_elements(stmt.value)
    if target is None or not strings:
        return None
    if all(_classify(s)[0] != "other" for s in strings):
        return target, strings
    return None


def _scan_gencode(tree: ast.AST, filename: str):
    """(gencode statements in source order, their target, the sm values) -- or KernelBuildError."""
    stmts: list[ast.stmt] = []
    claimed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            hit = _gencode_statement(node)
            if hit:
                stmts.append(node)
                claimed.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in claimed
                and _SUSPICIOUS.search(node.value)):
            raise KernelBuildError(
                f"{filename}:{node.lineno}: GPU architecture flag {node.value!r} is used in a form this rewrite "
                "does not recognise (it handles T.append/T.extend/T += of '-gencode' and 'arch=compute_XY,code=sm_XY' "
                "strings only). Refusing to build every architecture silently; adapt ssamba/kernels.py to this "
                "setup.py."
            )
    if not stmts:
        raise KernelBuildError(
            f"{filename}: no '-gencode' / 'arch=compute_XY,code=sm_XY' flags found, so the architecture list cannot be "
            "restricted (this setup.py is not shaped like mamba-ssm 2.3 / causal-conv1d 1.7). Refusing to build "
            "every architecture silently; adapt ssamba/kernels.py to this setup.py."
        )
    stmts.sort(key=lambda s: (s.lineno, s.col_offset))
    targets = {_gencode_statement(s)[0] for s in stmts}
    if len(targets) != 1:
        raise KernelBuildError(f"{filename}: -gencode flags go into several lists ({', '.join(sorted(targets))}); "
                               "not a recognised setup.py shape")
    target = targets.pop()
    found: list[str] = []
    pending_flag: Optional[int] = None
    for s in stmts:
        for value in _gencode_statement(s)[1]:
            kind, sm = _classify(value)
            if kind == "flag":
                if pending_flag is not None:
                    raise KernelBuildError(f"{filename}:{pending_flag}: '-gencode' not followed by an arch=... value")
                pending_flag = s.lineno
            elif kind == "value":
                if pending_flag is None:
                    raise KernelBuildError(f"{filename}:{s.lineno}: {value!r} without a preceding '-gencode'")
                pending_flag = None
                found.append(sm)
            else:  # both
                if pending_flag is not None:
                    raise KernelBuildError(f"{filename}:{pending_flag}: '-gencode' not followed by an arch=... value")
                found.append(sm)
    if pending_flag is not None:
        raise KernelBuildError(f"{filename}:{pending_flag}: '-gencode' not followed by an arch=... value")
    return stmts, target, found


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    out = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            out[id(child)] = node
    return out


def _find_anchor(tree: ast.AST, target: str, first: ast.stmt, filename: str) -> ast.stmt:
    """The last ``target = []`` before ``first`` whose block encloses ``first``."""
    parents = _parents(tree)
    ancestors = set()
    node: Optional[ast.AST] = first
    while node is not None:
        ancestors.add(id(node))
        node = parents.get(id(node))
    candidates = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == target):
            if node.lineno > first.lineno:
                raise KernelBuildError(f"{filename}:{node.lineno}: {target} is reassigned after its -gencode flags; "
                                       "not a recognised setup.py shape")
            empty = (isinstance(node.value, ast.List) and not node.value.elts) or (
                isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "list" and not node.value.args)
            if empty and id(parents.get(id(node))) in ancestors:
                candidates.append(node)
    if not candidates:
        raise KernelBuildError(f"{filename}: no '{target} = []' found before the first -gencode flag (line "
                               f"{first.lineno}); cannot place the local architecture. Not a recognised setup.py shape")
    return max(candidates, key=lambda n: n.lineno)


def restrict_gencode(source: str, archs: Sequence[Arch], filename: str = "setup.py") -> GencodeRewrite:
    """Rewrite a ``setup.py`` so its nvcc ``-gencode`` list is exactly ``archs``.

    Every statement that appends ``-gencode`` / ``arch=compute_XY,code=sm_XY`` strings to the flag list
    becomes ``pass`` (so ``if`` blocks stay valid), and one statement adding the local architectures goes
    right after the list's ``T = []``, at its indentation (unconditional, like the list itself). Raises
    :class:`KernelBuildError` when no such flags exist or they are used in a form not recognised here.
    """
    if not archs:
        raise KernelBuildError("no GPU architecture to build for")
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise KernelBuildError(f"{filename} does not parse: {e}") from e
    stmts, target, found = _scan_gencode(tree, filename)
    anchor = _find_anchor(tree, target, stmts[0], filename)

    lines = [ln.encode("utf-8") for ln in source.splitlines(keepends=True)]
    anchor_line = lines[anchor.lineno - 1]
    indent = anchor_line[: anchor.col_offset]
    if indent.strip():
        raise KernelBuildError(f"{filename}:{anchor.lineno}: '{target} = []' shares its line with another "
                               "statement; not a recognised setup.py shape")
    flags = ", ".join(f'"-gencode", "{a.gencode}"' for a in archs)
    insertion = (f"{indent.decode()}{target} += [{flags}]  {_MARK} only "
                 f"{', '.join(str(a) for a in archs)} (the local GPU)").encode("utf-8")
    end_line = lines[anchor.end_lineno - 1]
    body_end = len(end_line.rstrip(b"\r\n"))
    newline = end_line[body_end:] or b"\n"

    # (line, col, end_line, end_col, replacement); all positions 1-based lines, utf-8 byte columns
    edits = [(s.lineno, s.col_offset, s.end_lineno, s.end_col_offset, b"pass") for s in stmts]
    edits.append((anchor.end_lineno, body_end, anchor.end_lineno, body_end, newline + insertion))
    for line, col, eline, ecol, repl in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        head = lines[line - 1][:col]
        tail = lines[eline - 1][ecol:]
        lines[line - 1: eline] = [head + repl + tail]
    text = b"".join(lines).decode("utf-8")
    if anchor.end_lineno == len(source.splitlines()) and not source.endswith("\n"):
        text += "\n"

    # verify: parses, and now builds exactly `archs`
    try:
        new_tree = ast.parse(text, filename=filename)
    except SyntaxError as e:  # pragma: no cover - would be a bug in the edit above
        raise KernelBuildError(f"rewriting {filename} produced invalid Python ({e}); please report") from e
    _, new_target, kept = _scan_gencode(new_tree, filename)
    want = [a.sm for a in archs]
    if new_target != target or kept != want:  # pragma: no cover - would be a bug in the edit above
        raise KernelBuildError(f"rewriting {filename} kept {kept}, expected {want}; please report")
    diff = "".join(difflib.unified_diff(source.splitlines(keepends=True), text.splitlines(keepends=True),
                                        f"{filename} (original)", f"{filename} (local GPU only)"))
    return GencodeRewrite(text, found, kept, target, sorted({s.lineno for s in stmts}), anchor.lineno, diff)


def count_sources(source: str) -> Optional[int]:
    """How many files the setup.py's ``sources=[...]`` lists compile (ninja runs at most that many jobs)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "sources" and isinstance(node.value, (ast.List, ast.Tuple)):
            n += sum(1 for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return n or None


def setup_imports(source: str) -> list[str]:
    """Top-level modules a setup.py imports (to check the build environment before compiling)."""
    mods: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            top = n.split(".")[0]
            if top not in mods:
                mods.append(top)
    return mods


def split_jobs(total: int, caps: Sequence[Optional[int]]) -> list[int]:
    """Share ``total`` parallel jobs between builds running at once; build i never gets more than
    ``caps[i]`` (its number of source files; None = no cap) and each gets at least one."""
    k = len(caps)
    if k == 0:
        return []
    shares = [1] * k
    left = total - k
    while left > 0:
        grew = False
        for i in range(k):
            if left > 0 and (caps[i] is None or shares[i] < caps[i]):
                shares[i] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return shares


# --------------------------------------------------------------------------------------------------
# toolchain checks
# --------------------------------------------------------------------------------------------------


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def toolchain() -> dict:
    """torch / CUDA / nvcc / ninja facts of this machine (nothing is compiled)."""
    info: dict = {"python": sys.version.split()[0], "python_tag": _python_tag()}
    try:
        import torch
        import torch.utils.cpp_extension as cpp
    except Exception as e:  # pragma: no cover - torch is a dependency
        raise KernelBuildError(f"torch cannot be imported ({e}); the kernels are built against the installed torch")
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_home=cpp.CUDA_HOME,
                ninja=cpp.is_ninja_available())
    nvcc = Path(cpp.CUDA_HOME or "") / "bin" / "nvcc" if cpp.CUDA_HOME else None
    info["nvcc"] = str(nvcc) if nvcc and nvcc.exists() else None
    info["nvcc_version"] = None
    info["nvcc_codes"] = None
    info["cuda_include"] = bool(cpp.CUDA_HOME) and (Path(cpp.CUDA_HOME) / "include" / "cuda_runtime_api.h").is_file()
    info["cuda_candidates"] = sorted(str(p.parents[1])
                                     for p in Path("/usr/local").glob("cuda*/include/cuda_runtime_api.h"))
    if info["nvcc"]:
        try:
            out = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True, timeout=60).stdout
            m = re.search(r"release (\d+\.\d+)", out)
            info["nvcc_version"] = m.group(1) if m else None
            codes = subprocess.run([info["nvcc"], "--list-gpu-code"], capture_output=True, text=True, timeout=60)
            if codes.returncode == 0:
                info["nvcc_codes"] = codes.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def preflight(info: dict, archs: Sequence[Arch], setup_sources: dict[str, str]) -> list[str]:
    """Fail early (before minutes of compiling) when the build cannot work; return warnings."""
    warnings_: list[str] = []
    if not info.get("torch_cuda"):
        raise KernelBuildError(f"torch {info.get('torch')} is a CPU-only build; the kernels need a CUDA build of torch")
    if not info.get("nvcc"):
        raise KernelBuildError(
            f"nvcc not found (CUDA_HOME={info.get('cuda_home')!r}); install the CUDA toolkit matching torch's CUDA "
            f"{info.get('torch_cuda')} or set CUDA_HOME to it"
        )
    include = info.get("cuda_include")
    if include is not None and not include:
        raise KernelBuildError(
            f"CUDA_HOME={info.get('cuda_home')!r} (how torch finds the toolkit) has no include/cuda_runtime_api.h, "
            "so the C++ sources cannot compile; set CUDA_HOME to the toolkit root"
            + (f", e.g. CUDA_HOME={info['cuda_candidates'][0]}" if info.get("cuda_candidates") else "")
        )
    nv, tc = info.get("nvcc_version"), info.get("torch_cuda")
    if nv and tc and nv.split(".")[0] != tc.split(".")[0]:
        raise KernelBuildError(f"nvcc is CUDA {nv} but torch was built with CUDA {tc}; torch refuses to build "
                               "extensions across CUDA major versions. Point CUDA_HOME at a CUDA "
                               f"{tc.split('.')[0]}.x toolkit")
    codes = info.get("nvcc_codes")
    if codes:
        bad = [a for a in archs if f"sm_{a.sm}" not in codes]
        if bad:
            raise KernelBuildError(f"nvcc {nv} cannot generate code for {', '.join(map(str, bad))} "
                                   f"(it supports {' '.join(codes)})")
    if not info.get("ninja"):
        warnings_.append("ninja is not installed: torch compiles the CUDA files one after another and ignores MAX_JOBS "
                         "(pip install ninja to build in parallel)")
    for name, src in setup_sources.items():
        missing = [m for m in setup_imports(src) if importlib.util.find_spec(m) is None]
        if missing:
            raise KernelBuildError(f"{name}'s setup.py imports {', '.join(missing)}, not installed here "
                                   f"(pip install {' '.join(missing)}); pip runs it without build isolation")
    return warnings_


# --------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------


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
    return [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
            "--wheel-dir", str(out_dir), str(src)]


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


def find_reusable_wheel(wheel_dir: Path, pkg: KernelPackage, version: str, archs: Sequence[Arch],
                        info: dict) -> Optional[Path]:
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
        if (meta.get("archs") == [a.torch_name for a in archs] and meta.get("torch") == info.get("torch")
                and meta.get("python_tag") == info.get("python_tag")):
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
        log.write(f"$ cd {self.src}\n$ MAX_JOBS={self.jobs} {self.pkg.env_prefix}_FORCE_BUILD=TRUE "
                  f"TORCH_CUDA_ARCH_LIST={self.env.get('TORCH_CUDA_ARCH_LIST', '')} {' '.join(self.cmd)}\n\n")
        log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=self.src, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)

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


def run_builds(builds: Sequence[BuildJob], parallel: bool, out: TextIO, heartbeat: float = 60.0,
               poll: float = 0.2, on_done: Optional[Callable[[BuildJob], None]] = None) -> None:
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
                say(f"[{_fmt_time(time.monotonic() - t0)}] {b.pkg.name} {b.version}: compiling with {b.jobs} jobs "
                    f"(log: {b.log_path})")
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
        b.error = (f"the wheel holds no compiled {b.pkg.extension} extension (was "
                   f"{b.pkg.env_prefix}_SKIP_CUDA_BUILD set, or CUDA not found by setup.py?)")
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
    say(f"kernels for {', '.join(str(a) for a in archs)}: {', '.join(p.name for p in packages)} "
        f"(python {info['python']}, torch {info['torch']}, CUDA {info['torch_cuda']}, nvcc {info['nvcc_version']})")

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
                say(f"{pkg.name} {version}: reusing {whl} (built for the same architecture, torch and Python; "
                    "--force rebuilds)")
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
                say(f"{pkg.name} {sdist_version(sdist)}: setup.py lists {len(rw.found)} architectures ({listed}); "
                    f"building only {kept}")
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
            wheel_info_path(dest).write_text(json.dumps({
                "package": b.pkg.name, "version": b.version, "archs": [a.torch_name for a in archs],
                "torch": info["torch"], "torch_cuda": info["torch_cuda"], "nvcc": info["nvcc_version"],
                "python_tag": info["python_tag"], "build_seconds": round(b.seconds, 1), "jobs": b.jobs,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }, indent=2) + "\n")
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
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
               *[str(o.wheel) for o in ready]]
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
        say(f"{o.pkg.name:<15}{o.version:<14}{','.join(str(a) for a in archs):<10}{o.status:<9}"
            f"{o.jobs or '-':>5}  {_fmt_time(o.seconds):>8}  {wheel}")
    say(f"total wall time {_fmt_time(time.monotonic() - t_start)}")

    rc = 0 if not failed and installed_ok else 1
    if ready and not args.no_install and installed_ok:
        say("")
        say(f"$ {Path(sys.executable).name} -m ssamba.kernels check")
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        res = subprocess.run([sys.executable, "-m", "ssamba.kernels", "check", "--packages",
                              ",".join(o.pkg.name for o in ready)], env=env)
        rc = rc or res.returncode
    return rc


# --------------------------------------------------------------------------------------------------
# checking
# --------------------------------------------------------------------------------------------------


def _dist_version(pkg: KernelPackage) -> str:
    from importlib import metadata

    for name in (pkg.dist, pkg.name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _import_without_package_init(package: str, module: str):
    """Import ``package.<...>.module`` without running ``package/__init__.py`` (mamba_ssm's pulls in
    transformers and more). Registers a bare package module; used only to diagnose."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    stub = types.ModuleType(package)
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__file__ = spec.origin
    saved = {k: v for k, v in sys.modules.items() if k == package or k.startswith(package + ".")}
    for k in saved:
        del sys.modules[k]
    sys.modules[package] = stub
    try:
        return importlib.import_module(module)
    except BaseException:
        for k in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)
        raise


def _import_hint(exc: BaseException, pkg: KernelPackage) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] not in (pkg.dist, pkg.extension):
        return f"{msg} -- {pkg.dist} needs the module {exc.name!r} (pip install {exc.name.split('.')[0]})"
    if "undefined symbol" in str(exc):
        return (f"{msg} -- the extension was built against another torch; "
                "rebuild: python -m ssamba.kernels build --force")
    if isinstance(exc, ModuleNotFoundError):
        return f"{msg} -- build it: python -m ssamba.kernels build"
    return msg


def _rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check_scan(fn, device) -> tuple[bool, str]:
    import torch

    from ssamba.model.scan import selective_scan_ref

    g = torch.Generator(device=device).manual_seed(0)
    b, d, L, N = 2, 16, 96, 8

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    inputs = dict(u=r(b, d, L), delta=r(b, d, L, scale=0.5), A=-torch.exp(r(d, N, scale=0.5)), B=r(b, N, L),
                  C=r(b, N, L), D=r(d), z=r(b, d, L), delta_bias=r(d, scale=0.3))
    gout = r(b, d, L)
    res = {}
    for name, f in (("cuda", fn), ("ref", selective_scan_ref)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = f(**leaves, delta_softplus=True)
        out.backward(gout)
        torch.cuda.synchronize()
        res[name] = (out, {k: v.grad for k, v in leaves.items()})
    errs = {"out": _rel_err(res["cuda"][0], res["ref"][0])}
    errs.update({f"d{k}": _rel_err(res["cuda"][1][k], res["ref"][1][k]) for k in inputs})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < 1e-3
    return ok, (f"selective_scan_fn fp32 (b={b} d={d} L={L} N={N}, z, D, delta_bias, softplus) vs reference: "
                f"largest relative difference {errs[worst]:.1e} ({worst}) -> {'ok' if ok else 'MISMATCH'}")


def _check_conv(fn, device) -> tuple[bool, str]:
    import torch

    from ssamba.model.scan import causal_conv1d_ref

    g = torch.Generator(device=device).manual_seed(0)
    b, d, L, W = 2, 64, 80, 4
    inputs = dict(x=torch.randn(b, d, L, generator=g, device=device),
                  weight=torch.randn(d, W, generator=g, device=device) * 0.5,
                  bias=torch.randn(d, generator=g, device=device))
    gout = torch.randn(b, d, L, generator=g, device=device)
    res = {}
    for name, f in (("cuda", fn), ("ref", causal_conv1d_ref)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = f(leaves["x"], leaves["weight"], leaves["bias"], activation="silu")
        out.backward(gout)
        torch.cuda.synchronize()
        res[name] = (out, {k: v.grad for k, v in leaves.items()})
    errs = {"out": _rel_err(res["cuda"][0], res["ref"][0])}
    errs.update({f"d{k}": _rel_err(res["cuda"][1][k], res["ref"][1][k]) for k in inputs})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < 1e-3
    return ok, (f"causal_conv1d_fn fp32 (b={b} d={d} L={L} width={W}, bias, silu) vs reference: "
                f"largest relative difference {errs[worst]:.1e} ({worst}) -> {'ok' if ok else 'MISMATCH'}")


_CHECKS = {
    "mamba-ssm": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", _check_scan),
    "causal-conv1d": ("causal_conv1d", "causal_conv1d_fn", _check_conv),
}


def cmd_check(args, out: Optional[TextIO] = None) -> int:
    """``check``: import the kernels, compare a tiny GPU call with the reference; 0 when all is well."""
    out = out or sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    import warnings

    import torch

    packages = args.packages
    say(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    # what the model will pick, asked first, before anything below touches sys.modules
    from ssamba.model.kernels import resolve_backend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = resolve_backend("auto")
    if not torch.cuda.is_available():
        say("no CUDA device is visible: the kernels cannot run here (resolve_backend('auto') -> 'reference')")
        return 1
    dev = torch.device("cuda", torch.cuda.current_device())
    cap = torch.cuda.get_device_capability(dev)
    say(f"GPU: {torch.cuda.get_device_name(dev)} (sm_{cap[0]}{cap[1]})")
    ok = True
    for pkg in packages:
        module, attr, run = _CHECKS[pkg.name]
        version = _dist_version(pkg)
        fn, how = None, ""
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as e:  # ImportError, OSError, undefined symbol ...
            hint = _import_hint(e, pkg)
            if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith((pkg.dist, pkg.extension)):
                try:
                    fn = getattr(_import_without_package_init(pkg.dist, module), attr)
                    how = (f" [imported by bypassing {pkg.dist}/__init__.py, which fails: {hint}; the plain "
                           f"`from {module} import {attr}` fails the same way]")
                except Exception as e2:
                    hint = f"{hint}; without its __init__: {_import_hint(e2, pkg)}"
            if fn is None:
                ok = False
                say(f"{pkg.name} {version}: cannot import {module}.{attr}: {hint}")
                continue
        try:
            ext = importlib.import_module(pkg.extension)
            where = getattr(ext, "__file__", "?")
        except Exception:
            where = "?"
        say(f"{pkg.name} {version}: extension {where}{how}")
        try:
            good, line = run(fn, dev)
        except Exception as e:
            good = False
            text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            if "no kernel image" in text:
                text += (f" -- built for another GPU architecture than sm_{cap[0]}{cap[1]}: "
                         "python -m ssamba.kernels build --force")
            line = f"running it on the GPU failed: {text}"
            traceback.print_exc(file=out)
        ok = ok and good
        say(f"  {line}")
    why = "; ".join(str(w.message) for w in caught)
    say(f"ssamba.model.kernels.resolve_backend('auto') -> {backend!r}"
        + (f" ({why})" if why and backend != "cuda" else ""))
    if any(p.name == "mamba-ssm" for p in packages) and backend != "cuda":
        ok = False
        say("  the model would NOT use the CUDA scan")
    say("check passed" if ok else "check FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _packages_arg(text: str) -> list[KernelPackage]:
    try:
        return parse_packages(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _arch_arg(text: str):
    if text.strip().lower() == "auto":
        return "auto"  # detected later, so argument errors come first
    try:
        return parse_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssamba.kernels",
                                description="Build (for the local GPU only) and check the mamba-ssm and causal-conv1d "
                                            "CUDA kernels from their source distributions.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,check}")
    all_pk = ",".join(PACKAGES)
    b = sub.add_parser("build", help="compile wheels for the local GPU architecture, install them, run check")
    b.add_argument("--sdist-dir", help="folder holding the sdists (default: $SSAMBA_SDISTS or ./carry/sdists)")
    b.add_argument("--packages", type=_packages_arg, default=parse_packages(all_pk), help=f"default: {all_pk}")
    b.add_argument("--arch", type=_arch_arg, default="auto",
                   help="auto (the visible GPUs) or compute capabilities, e.g. 9.0 or 8.0,9.0 (default: auto)")
    b.add_argument("--jobs", type=_positive_int, default=None, help="parallel compile jobs in all (default: CPU count)")
    b.add_argument("--wheel-dir", help="where the wheels go (default: $SSAMBA_WHEELS or ./carry/wheels)")
    b.add_argument("--log-dir", help="build logs (default: WHEEL_DIR/logs)")
    b.add_argument("--no-install", action="store_true", help="only build the wheels")
    b.add_argument("--parallel", action="store_true", help="build both packages at once, sharing the jobs")
    b.add_argument("--force", action="store_true", help="rebuild even if WHEEL_DIR has a matching wheel")
    c = sub.add_parser("check", help="import the kernels and compare a tiny call with the reference on the GPU")
    c.add_argument("--packages", type=_packages_arg, default=parse_packages(all_pk), help=f"default: {all_pk}")
    return p


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            if args.arch == "auto":
                args.arch = detect_archs()
            return cmd_build(args, out)
        return cmd_check(args, out)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
