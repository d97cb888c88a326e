"""Where a run's code came from and where its results go: ``git.commit`` when the code runs in Ray's copy of a
submitted job's working directory (git's HEAD files travel, its objects do not), and the warning when results
would land inside that temporary copy. Real git repositories and Ray's own packager; no Ray started."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from ssamba.sweep.driver import GIT_COMMIT_ENV, git_commit, ray_job_copy, read_git_head, temporary_copy_warnings

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _repo(path: Path, rayignore: str | None = None) -> str:
    """A clone-like repository (a ``.git`` folder) holding a package; returns its HEAD commit."""
    (path / "pkg").mkdir(parents=True)
    (path / "pkg" / "__init__.py").write_text("")
    (path / ".rayignore").write_text(rayignore if rayignore is not None else (ROOT / ".rayignore").read_text())
    _git(path, "init")
    _git(path, "add", ".")
    _git(path, "commit", "-m", "one")
    return _git(path, "rev-parse", "HEAD")


def _submit_copy(repo: Path, dest: Path) -> Path:
    """What `ray job submit --working-dir repo` extracts on the cluster: Ray's own packager, then unzip."""
    from ray._private.runtime_env.packaging import create_package

    dest.parent.mkdir(parents=True, exist_ok=True)
    pkg = dest.parent / "pkg.zip"
    create_package(str(repo), pkg, include_gitignore=True)
    with zipfile.ZipFile(pkg) as z:
        z.extractall(dest)
    return dest


def test_a_submitted_jobs_copy_knows_its_commit(tmp_path):
    sha = _repo(tmp_path / "clone")
    copy = _submit_copy(tmp_path / "clone", tmp_path / "session" / "_ray_pkg_0f1e2d")
    assert (copy / ".git" / "HEAD").is_file() and (copy / ".git" / "refs" / "heads" / "main").is_file()
    assert not (copy / ".git" / "objects").exists() and not (copy / ".git" / "config").exists()  # small, no remotes
    no_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=copy / "pkg", capture_output=True, text=True)
    assert no_git.returncode != 0  # git itself cannot tell without its objects
    assert git_commit(copy / "pkg", environ={}) == sha


def test_without_the_rayignore_exceptions_the_commit_is_unknown(tmp_path):
    """The failure this fixes: `.git/` ignored as a whole leaves the job's runs with git.commit=unknown."""
    _repo(tmp_path / "clone", rayignore=".git/\n")
    copy = _submit_copy(tmp_path / "clone", tmp_path / "session" / "_ray_pkg_0f1e2d")
    assert not (copy / ".git").exists()
    assert git_commit(copy / "pkg", environ={}) == "unknown"


def test_head_read_from_packed_refs_a_worktree_and_a_detached_head(tmp_path):
    repo = tmp_path / "repo"
    sha = _repo(repo)
    _git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert read_git_head(repo / "pkg") == sha  # from .git/packed-refs

    wt = tmp_path / "wt"
    _git(repo, "worktree", "add", "-b", "other", str(wt))
    assert (wt / ".git").is_file()  # "gitdir: .../.git/worktrees/wt"
    (wt / "pkg" / "more.py").write_text("x = 1\n")
    _git(wt, "add", ".")
    _git(wt, "commit", "-m", "two")
    assert read_git_head(wt / "pkg") == _git(wt, "rev-parse", "HEAD") != sha
    assert read_git_head(repo) == sha

    _git(repo, "checkout", "--detach")
    assert read_git_head(repo) == sha


def test_the_environment_names_the_commit_and_no_repository_is_unknown(tmp_path):
    assert git_commit(tmp_path, environ={GIT_COMMIT_ENV: "1234abcd"}) == "1234abcd"
    assert read_git_head(tmp_path) is None
    assert git_commit(tmp_path, environ={}) == "unknown"


def test_results_inside_a_jobs_temporary_copy_are_warned_about(tmp_path):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_5e6f"
    (copy / "sweeps").mkdir(parents=True)
    job = {"RAY_JOB_SUBMISSION_ID": "raysubmit_abc"}
    assert ray_job_copy(copy / "sweeps", environ=job) == copy
    assert ray_job_copy(copy, environ={}) is None  # not a job
    assert ray_job_copy(tmp_path, environ=job) is None  # a job run where it was started, not in a copy

    storage_w, store_w = temporary_copy_warnings(copy / "sweep_results", f"sqlite:///{copy / 'mlflow.db'}", copy)
    assert f"--storage resolves to {copy / 'sweep_results'}" in storage_w and "--storage /shared" in storage_w
    assert f"{copy / 'mlflow.db'}" in store_w and "--mlflow-uri" in store_w
    assert temporary_copy_warnings(tmp_path / "shared", f"sqlite:///{tmp_path / 'm.db'}", copy) == []
    assert temporary_copy_warnings(copy / "sweep_results", "http://head:5000", None) == []
