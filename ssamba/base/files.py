"""Files written whole or not at all, and locks between processes: the one implementation of each.

A reader (another process, a resumed run) never sees a half-written file: :func:`atomic_path` hands out a
temporary name in the target's folder (``<name>.<random>.tmp``, or ``.<name>.<random>.tmp`` with
``hidden``) and renames it over the target only when the block ends without error; a killed writer leaves
only the temporary file, which the owners of each folder sweep up (``*.tmp``).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, hidden: bool = False) -> Iterator[Path]:
    """A temporary path that becomes ``path`` (``os.replace``) when the block succeeds; removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=("." if hidden else "") + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path`` held for the block; released if the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
