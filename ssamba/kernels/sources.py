"""Finding, versioning and extracting the packages' source distributions."""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

from ssamba.base.errors import KernelBuildError
from ssamba.kernels.packages import PACKAGES, SDIST_SUFFIXES, KernelPackage, _canon


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
