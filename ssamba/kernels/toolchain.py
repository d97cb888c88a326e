"""What the machine has to compile with (nvcc, CUDA headers, torch) and the checks made before a build."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ssamba.base.errors import KernelBuildError
from ssamba.kernels.packages import Arch
from ssamba.kernels.setup_patch import setup_imports


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
    info.update(
        torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_home=cpp.CUDA_HOME, ninja=cpp.is_ninja_available()
    )
    nvcc = Path(cpp.CUDA_HOME or "") / "bin" / "nvcc" if cpp.CUDA_HOME else None
    info["nvcc"] = str(nvcc) if nvcc and nvcc.exists() else None
    info["nvcc_version"] = None
    info["nvcc_codes"] = None
    info["cuda_include"] = bool(cpp.CUDA_HOME) and (Path(cpp.CUDA_HOME) / "include" / "cuda_runtime_api.h").is_file()
    info["cuda_candidates"] = sorted(
        str(p.parents[1]) for p in Path("/usr/local").glob("cuda*/include/cuda_runtime_api.h")
    )
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
        raise KernelBuildError(
            f"nvcc is CUDA {nv} but torch was built with CUDA {tc}; torch refuses to build "
            "extensions across CUDA major versions. Point CUDA_HOME at a CUDA "
            f"{tc.split('.')[0]}.x toolkit"
        )
    codes = info.get("nvcc_codes")
    if codes:
        bad = [a for a in archs if f"sm_{a.sm}" not in codes]
        if bad:
            raise KernelBuildError(
                f"nvcc {nv} cannot generate code for {', '.join(map(str, bad))} (it supports {' '.join(codes)})"
            )
    if not info.get("ninja"):
        warnings_.append(
            "ninja is not installed: torch compiles the CUDA files one after another and ignores MAX_JOBS "
            "(pip install ninja to build in parallel)"
        )
    for name, src in setup_sources.items():
        missing = [m for m in setup_imports(src) if importlib.util.find_spec(m) is None]
        if missing:
            raise KernelBuildError(
                f"{name}'s setup.py imports {', '.join(missing)}, not installed here "
                f"(pip install {' '.join(missing)}); pip runs it without build isolation"
            )
    return warnings_
