"""Where the reference fixtures live, found one way by every test that reads them.

The folder is ``$INTERLEAF_FIXTURES``, else ``shared/fixtures`` beside the project's folder
(``<project>/../shared/fixtures``). Fixture folders are discovered by their files, so a fixture of
another seed or size is checked without a code change. A missing folder, or no fixture in it, FAILS
the test (never skips): the parity checks must not silently disappear.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pytest

ENV = "INTERLEAF_FIXTURES"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def fixtures_root() -> Path:
    """The folder holding the fixture folders; fails the test when it does not exist."""
    value = os.environ.get(ENV)
    root = Path(value) if value else PROJECT_ROOT.parent / "shared" / "fixtures"
    if not root.is_dir():
        pytest.fail(f"reference fixtures not found at {root}: set {ENV} to the folder that holds them", pytrace=False)
    return root


def fixture_dirs(prefix: str, has: Sequence[str] = ("README.md",), lacks: Sequence[str] = ()) -> list[Path]:
    """Every fixture folder named ``prefix*`` holding all files in ``has`` and none in ``lacks``, sorted by name.

    Fails the test when none is found.
    """
    root = fixtures_root()
    found = sorted(
        d for d in root.iterdir()
        if d.is_dir() and d.name.startswith(prefix)
        and all((d / f).exists() for f in has) and not any((d / f).exists() for f in lacks)
    )
    if not found:
        pytest.fail(f"no fixture folder {prefix}* with {list(has)} (and without {list(lacks)}) in {root}",
                    pytrace=False)
    return found
