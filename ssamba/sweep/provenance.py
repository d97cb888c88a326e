"""Which code a sweep ran: the git commit to record (a clone, an editable install, or a submitted job's copy
of the working folder), and warnings when results would land in a temporary copy."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

GIT_COMMIT_ENV = "SSAMBA_GIT_COMMIT"  # the commit to record, when the code runs without its repository
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the ssamba package (a clone, or Ray's copy)
_CODE_FOLDERS, _CODE_SUFFIXES = ("ssamba", "ablations", "sweeps"), (".py", ".cu")


def read_git_head(start: str | os.PathLike) -> str | None:
    """The commit checked out in the git work tree holding ``start``, read from git's files alone (no git
    binary): ``.git/HEAD``, the branch it names (a loose ref or a line of ``packed-refs``), following the
    ``gitdir:`` file of a worktree. None when there is no repository or HEAD does not resolve."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        dotgit = folder / ".git"
        try:
            if dotgit.is_file():  # a worktree or submodule: "gitdir: PATH"
                text = dotgit.read_text().strip()
                if not text.startswith("gitdir:"):
                    return None
                gitdir = (folder / text[len("gitdir:") :].strip()).resolve()
            elif dotgit.is_dir():
                gitdir = dotgit
            else:
                continue
            head = (gitdir / "HEAD").read_text().strip()
            if _SHA.fullmatch(head):
                return head  # detached
            if not head.startswith("ref:"):
                return None
            ref = head[len("ref:") :].strip()
            common = gitdir
            if (gitdir / "commondir").is_file():  # a worktree's branches live in the main repository
                common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
            for base in (gitdir, common):
                if (base / ref).is_file():
                    sha = (base / ref).read_text().strip()
                    return sha if _SHA.fullmatch(sha) else None
            if (common / "packed-refs").is_file():
                for line in (common / "packed-refs").read_text().splitlines():
                    sha, _, name = line.partition(" ")
                    if name.strip() == ref and _SHA.fullmatch(sha):
                        return sha
            return None
        except OSError:
            return None
    return None


def _head(where: Path) -> str | None:
    """``git rev-parse HEAD`` in ``where``, else :func:`read_git_head`."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=where)
        if out.returncode == 0 and _SHA.fullmatch(out.stdout.strip()):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return read_git_head(where)


def installed_source(dist: str = "ssamba") -> Path | None:
    """The folder an editable install (``pip install -e``) of the project points at (its ``direct_url.json``,
    PEP 610), None for another kind of install."""
    import importlib.metadata
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    # every copy of the metadata on sys.path: run from the source folder, its own ssamba.egg-info (which
    # setuptools writes there, without direct_url.json) comes before the install's dist-info
    for d in importlib.metadata.distributions(name=dist):
        try:
            info = json.loads(d.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = info.get("url", "")
        if url.startswith("file:") and info.get("dir_info", {}).get("editable"):
            return Path(url2pathname(urlparse(url).path))
    return None


def same_code(a: Path, b: Path) -> bool:
    """Whether two copies of the project hold the same sources (every ``.py`` and ``.cu`` file under
    ``ssamba/``, ``ablations/``, ``sweeps/``, byte for byte)."""

    def files(root: Path) -> dict[Path, Path]:
        return {
            p.relative_to(root): p
            for top in _CODE_FOLDERS
            for p in (root / top).rglob("*")
            if p.suffix in _CODE_SUFFIXES and "__pycache__" not in p.parts
        }

    fa, fb = files(a), files(b)
    return bool(fa) and fa.keys() == fb.keys() and all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)


def git_commit(
    code: str | os.PathLike | None = None, environ: dict | None = None, installed: Path | None | bool = True
) -> str:
    """The commit of the code that runs (``code``: the folder holding the package):

    1. ``$SSAMBA_GIT_COMMIT``, when set;
    2. the HEAD of the git work tree the code sits in;
    3. the code has no repository (Ray's copy of a submitted job's working directory: Ray leaves ``.git``
       out): the HEAD of the editable install's source folder (``installed``; True: look it up), when that
       folder holds the same sources, byte for byte, as the code that runs;
    4. ``unknown``."""
    env = os.environ if environ is None else environ
    if env.get(GIT_COMMIT_ENV, "").strip():
        return env[GIT_COMMIT_ENV].strip()
    where = Path(code) if code is not None else CODE_ROOT
    sha = _head(where) if ray_job_copy(where) is None else None  # (a job's copy may sit inside an unrelated repo)
    if sha:
        return sha
    source = installed_source() if installed is True else installed or None
    if source is not None and source.resolve() != where.resolve() and same_code(where, source):
        return _head(source) or "unknown"
    return "unknown"


def ray_job_copy(cwd: str | os.PathLike | None = None) -> Path | None:
    """Ray's temporary copy of a submitted job's working directory (``ray job submit --working-dir``:
    ``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``) when ``cwd`` is in one, else None."""
    here = Path(cwd or os.getcwd()).resolve()
    return next(
        (f for f in (here, *here.parents) if f.name.startswith("_ray_pkg_") and f.parent.name == "working_dir_files"),
        None,
    )


def temporary_copy_warnings(storage: str | os.PathLike, mlflow_uri: str, copy: Path | None) -> list[str]:
    """What would be written inside Ray's temporary copy of a job's working directory (``copy``): the sweep
    storage, a local MLflow store. Ray deletes that copy with its session, and other nodes do not see it."""
    if copy is None:
        return []
    out = []
    storage = Path(storage).resolve()
    if storage.is_relative_to(copy):
        out.append(
            f"--storage resolves to {storage}, inside Ray's temporary copy of the job's working directory "
            f"({copy}): the checkpoints and the sweep's state are lost with it and other nodes do not see "
            f"them. Give an absolute path on storage every node sees, e.g. --storage /shared/sweeps"
        )
    store = local_store_path(mlflow_uri)
    if store is not None and store.is_relative_to(copy):
        out.append(
            f"the MLflow store {store} is inside Ray's temporary copy of the job's working directory ({copy}): "
            f"the runs are lost with it. Pass --mlflow-uri with an absolute path (sqlite:////shared/mlflow.db) "
            f"or a server (http://HEAD:5000)"
        )
    return out


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``sqlite:///``, ``file:``), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve()
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path)).resolve()
    return None
