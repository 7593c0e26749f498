"""Content fingerprints of files on disk: the sha256 that checkpoint manifests and evaluation records carry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 22  # bytes read at a time


def file_digest(path: str | Path, sync: bool = False) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file; ``sync`` also flushes it to the disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def file_hash(path: str | Path) -> str:
    """sha256 hex of a file, or ``listing:`` + the sha256 of a folder's listing (relative names and sizes)."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(path).as_posix()}:{p.stat().st_size}\n".encode())
        return "listing:" + h.hexdigest()
    return file_digest(path)[1]


__all__ = ["file_digest", "file_hash"]
