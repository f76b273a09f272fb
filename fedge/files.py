"""File helpers shared by the export, the device store and the server checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (model files do not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_safe_relpath(rel: str) -> bool:
    """Whether ``rel`` is a plain relative POSIX path that stays inside the directory it is joined to.

    Refused: absolute paths, backslashes, and empty, ``.`` or ``..`` parts (the names come
    from a received artifact or manifest, and must not write or read outside it).
    """
    return not (rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")))
