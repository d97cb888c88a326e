"""The two kernel packages (mamba-ssm, causal-conv1d) and the GPU architectures they are built for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from ssamba.base.errors import KernelBuildError


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
