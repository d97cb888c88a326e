"""ssamba.base.files: atomic writes and the inter-process lock."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from ssamba.base.files import atomic_path, file_lock, write_json_atomic


def test_atomic_path_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": 1})
    assert target.read_text().startswith("{") and not list(target.parent.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert '"x": 1' in target.read_text()  # the old content, untouched
    assert not list(target.parent.glob("*.tmp"))  # and no temporary left behind
    with atomic_path(target, hidden=True) as tmp:
        assert tmp.name.startswith(".a.json.") and tmp.name.endswith(".tmp") and tmp.parent == target.parent
        tmp.write_text("new")
    assert target.read_text() == "new"


def _hold(path, seconds, started):
    with file_lock(path):
        started.set()
        time.sleep(seconds)


def test_file_lock_excludes_another_process(tmp_path):
    lock = tmp_path / "x.lock"
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold, args=(lock, 1.0, started))
    p.start()
    try:
        assert started.wait(60)
        t0 = time.monotonic()
        with file_lock(lock):
            waited = time.monotonic() - t0
        assert waited > 0.5, waited  # held by the other process until it let go
    finally:
        p.join(30)
