"""The reference fixtures: numbers the seeds' public code produced on tiny random weights.

They live in one folder, named by the environment variable ``INTERLEAF_FIXTURES``; by default
``<project root>/../shared/fixtures``. Each fixture is a sub-folder with a README saying what it
holds (``model.safetensors``, ``inputs.safetensors``, ``outputs.safetensors``, ``config.json``).
Tests find the folders by prefix and then by their files, so a fixture of another seed or size is
checked without a code change. A missing folder FAILS the test (never a skip): CI must have them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ENV = "INTERLEAF_FIXTURES"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def fixtures_root() -> Path:
    """The fixtures folder (``$INTERLEAF_FIXTURES``, else ``<project>/../shared/fixtures``); fails when absent."""
    value = os.environ.get(ENV)
    root = Path(value).expanduser() if value else PROJECT_ROOT.parent / "shared" / "fixtures"
    if not root.is_dir():
        pytest.fail(
            f"the reference fixtures folder {str(root)!r} does not exist: set {ENV} to the folder that holds "
            f"the fixture folders (xgenmm-*, openflamingo-*, ...); default <project>/../shared/fixtures",
            pytrace=False,
        )
    return root


def fixture_dirs(prefix: str = "", has: Sequence[str] = (), lacks: Sequence[str] = ()) -> list[Path]:
    """Every fixture folder named ``prefix*`` holding all files in ``has`` and none in ``lacks``, sorted
    by name; fails the test when there is none."""
    root = fixtures_root()
    dirs = sorted(
        d for d in root.iterdir()
        if d.is_dir() and d.name.startswith(prefix)
        and all((d / f).exists() for f in has) and not any((d / f).exists() for f in lacks)
    )
    if not dirs:
        pytest.fail(f"no fixture folder {prefix}* with {list(has)} (and without {list(lacks)}) in {str(root)!r} "
                    f"({ENV})", pytrace=False)
    return dirs


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, without reading the tensors ([] when the file is absent)."""
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    return load_file(str(path))


def config(folder: Path) -> dict[str, Any]:
    """A fixture's ``config.json``."""
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))
