"""Where the project keeps generated files: ``$SSAMBA_CACHE`` or ``~/.cache/ssamba``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (created), optionally a sub-folder of it."""
    root = Path(os.environ.get("SSAMBA_CACHE") or Path.home() / ".cache" / "ssamba").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
