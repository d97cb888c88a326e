"""Where a run's code came from and where its results go: ``git.commit`` when the code runs in Ray's copy of a
submitted job's working directory (Ray leaves ``.git`` out of it), and the warning when results would land
inside that temporary copy. Real git repositories and Ray's own packager with its default excludes (what
``ray job submit --working-dir`` uploads); no Ray started."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from ssamba.sweep.provenance import GIT_COMMIT_ENV, git_commit, ray_job_copy, read_git_head, temporary_copy_warnings

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


def _repo(path: Path) -> str:
    """A clone-like repository (a ``.git`` folder) holding the project's source folders; its HEAD commit."""
    for rel, text in {
        "ssamba/__init__.py": "",
        "ssamba/sweep/driver.py": "x = 1\n",
        "sweeps/norm.py": "y = 2\n",
    }.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    _git(path, "init")
    _git(path, "add", ".")
    _git(path, "commit", "-m", "one")
    return _git(path, "rev-parse", "HEAD")


def _submit_copy(repo: Path, session: Path) -> Path:
    """What `ray job submit --working-dir repo` extracts on the cluster: Ray's packager with Ray's default
    excludes (``.git`` among them), unzipped where Ray puts it."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    dest = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_0f1e2d3c"
    dest.parent.mkdir(parents=True)
    pkg = session / "pkg.zip"
    create_package(str(repo), pkg, include_gitignore=True, excludes=ray_constants.get_runtime_env_default_excludes())
    with zipfile.ZipFile(pkg) as z:
        z.extractall(dest)
    return dest


def test_a_submitted_jobs_copy_takes_the_commit_of_the_install_holding_the_same_code(tmp_path):
    clone = tmp_path / "clone"
    sha = _repo(clone)
    copy = _submit_copy(clone, tmp_path / "session")
    assert not (copy / ".git").exists() and (copy / "ssamba" / "sweep" / "driver.py").is_file()
    assert git_commit(copy, environ={}, installed=None) == "unknown"  # no repository, no install: cannot tell
    assert git_commit(copy, environ={}, installed=clone) == sha  # `pip install -e` of the submitted clone

    (clone / "sweeps" / "norm.py").write_text("y = 3\n")  # the install's tree moved on: not the code that runs
    assert git_commit(copy, environ={}, installed=clone) == "unknown"
    (clone / "sweeps" / "norm.py").write_text("y = 2\n")
    (copy / "ssamba" / "extra.py").write_text("")  # nor when the copy holds a file the install lacks
    assert git_commit(copy, environ={}, installed=clone) == "unknown"


def test_a_copy_inside_an_unrelated_repository_does_not_take_its_commit(tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    _git(outer, "init")
    _git(outer, "commit", "--allow-empty", "-m", "unrelated")
    clone = tmp_path / "clone"
    sha = _repo(clone)
    copy = _submit_copy(clone, outer / "ray_session")  # Ray's temp dir happens to sit in another repository
    assert git_commit(copy, environ={}, installed=None) == "unknown"
    assert git_commit(copy, environ={}, installed=clone) == sha


def test_head_read_from_packed_refs_a_worktree_and_a_detached_head(tmp_path):
    repo = tmp_path / "repo"
    sha = _repo(repo)
    _git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert read_git_head(repo / "ssamba") == sha  # from .git/packed-refs

    wt = tmp_path / "wt"
    _git(repo, "worktree", "add", "-b", "other", str(wt))
    assert (wt / ".git").is_file()  # "gitdir: .../.git/worktrees/wt"
    (wt / "ssamba" / "more.py").write_text("z = 1\n")
    _git(wt, "add", ".")
    _git(wt, "commit", "-m", "two")
    assert read_git_head(wt / "ssamba") == _git(wt, "rev-parse", "HEAD") != sha
    assert read_git_head(repo) == sha

    _git(repo, "checkout", "--detach")
    assert read_git_head(repo) == sha


def test_the_environment_names_the_commit_and_no_repository_is_unknown(tmp_path):
    assert git_commit(tmp_path, environ={GIT_COMMIT_ENV: "1234abcd"}) == "1234abcd"
    assert read_git_head(tmp_path) is None
    assert git_commit(tmp_path, environ={}, installed=None) == "unknown"


def test_results_inside_a_jobs_temporary_copy_are_warned_about(tmp_path):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_5e6f"
    (copy / "sweeps").mkdir(parents=True)
    assert ray_job_copy(copy / "sweeps") == copy
    assert ray_job_copy(tmp_path) is None

    storage_w, store_w = temporary_copy_warnings(copy / "sweep_results", f"sqlite:///{copy / 'mlflow.db'}", copy)
    assert f"--storage resolves to {copy / 'sweep_results'}" in storage_w and "--storage /shared" in storage_w
    assert f"{copy / 'mlflow.db'}" in store_w and "--mlflow-uri" in store_w
    assert temporary_copy_warnings(tmp_path / "shared", f"sqlite:///{tmp_path / 'm.db'}", copy) == []
    assert temporary_copy_warnings(copy / "sweep_results", "http://head:5000", None) == []
