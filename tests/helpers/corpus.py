"""Synthetic corpora written once per test session and shared read-only (see ``conftest.synth_corpus``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from interleaf.data.synth import write_corpus


def fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime in ns)}`` of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


class SessionCorpora:
    """One corpus per distinct set of ``write_corpus`` arguments, written on first use under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.written: dict[tuple, tuple[Path, dict[str, tuple[int, int]]]] = {}

    def get(self, **params) -> Path:
        key = tuple(sorted(params.items()))
        if key not in self.written:
            path = self.root / f"corpus-{len(self.written)}"
            write_corpus(path, **params)
            self.written[key] = (path, fingerprint(path))
        return self.written[key][0]

    def copy(self, dst: Path, **params) -> Path:
        """A private copy of the shared corpus for ``params``, for a test that writes into it."""
        shutil.copytree(self.get(**params), dst)
        return dst

    def changes(self) -> list[str]:
        """The shared corpora some test wrote into since they were written, one line each."""
        problems = []
        for key, (path, before) in self.written.items():
            after = fingerprint(path)
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            if changed:
                problems.append(f"the shared corpus {dict(key)} at {path} was changed: {', '.join(changed[:10])}")
        return problems
