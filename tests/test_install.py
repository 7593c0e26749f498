"""The package as a user installs it: a wheel in a fresh virtual environment, used from an empty directory.

Offline, with what is already installed:

- the wheel is built from a copy of the repository's sources (so that the build writes nothing into
  the repository) with the running environment's setuptools (``--no-build-isolation``: an isolated
  build would have to download setuptools);
- a fresh virtual environment without pip is created, and the dependencies are made visible to it
  by a ``.pth`` file naming the running environment's site-packages. An editable install of
  interleaf there stays invisible: its own ``.pth`` file is only read from a site directory, not
  from a directory a ``.pth`` file adds, which the test checks (``import interleaf`` must load the
  installed copy);
- the wheel is installed into it with ``pip --python`` (``--no-deps --no-index``, not editable);
- from an empty directory, ``interleaf recipes`` lists the packaged recipes, and ``interleaf demo``
  runs end to end at its smallest (the minimum of scenes, one step per stage): its first step
  writes the corpus and the tokenizer, then the packaged recipe ``demo`` and its data configs are
  read from the installed package. No option stops the demo after its first step; this whole run
  takes seconds.

Nothing may be written into the repository meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MIN_SETUPTOOLS = 77  # pyproject.toml's build requirement
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}


def _repo_files() -> dict[str, tuple[int, int]]:
    """``{path: (size, mtime in ns)}`` of the repository's files (not .git, the virtual environment or caches)."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and Path(dirpath, d) != Path(sys.prefix)]
        for name in filenames:
            stat = Path(dirpath, name).stat()
            files[str(Path(dirpath, name).relative_to(REPO))] = (stat.st_size, stat.st_mtime_ns)
    return files


def _setuptools_major() -> int:
    try:
        return int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "INTERLEAF_DEMO_CORPUS"}}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd: list, cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _build_wheel(tmp: Path, env: dict[str, str]) -> Path:
    source = tmp / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist",
          source], tmp, env)
    [wheel] = (tmp / "dist").glob("interleaf-*.whl")
    return wheel


def _fresh_venv(tmp: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """(its python, its site-packages), the running environment's packages visible through a .pth file."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "running-environment.pth").write_text("".join(f"{path}\n" for path in ours), encoding="utf-8")
    return python, site


@pytest.mark.timeout(900)
def test_a_plain_install_runs_recipes_and_the_demo_from_an_empty_directory(tmp_path):
    # `make venv` installs it; another environment needs it too, or the offline build below cannot run
    assert _setuptools_major() >= MIN_SETUPTOOLS, (
        f"building the wheel offline needs setuptools>={MIN_SETUPTOOLS} in the environment running the tests: "
        f"pip install 'setuptools>={MIN_SETUPTOOLS}'")
    before = _repo_files()
    env = _offline_env()
    wheel = _build_wheel(tmp_path, env)
    python, site = _fresh_venv(tmp_path, env)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path, env)

    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([python, "-c", "import interleaf; print(interleaf.__file__)"], empty, env).strip()
    assert Path(where).is_relative_to(site / "interleaf"), f"interleaf was imported from {where}, not from {site}"
    interleaf = python.parent / "interleaf"  # the console script the wheel installed

    listing = _run([interleaf, "recipes"], empty, env)
    names = {line.split()[0] for line in listing.splitlines() if line and not line[0].isspace()}
    assert {"demo", "sft_llava", "pretrain"} <= names, listing
    files = [Path(line.strip()) for line in listing.splitlines() if line.strip().endswith(".yaml")]
    assert files and all(f.is_relative_to(site / "interleaf") and f.is_file() for f in files), listing

    steps = [arg for i in range(4) for arg in ("--set", f"stages.{i}.max_steps=1")]
    _run([interleaf, "demo", "--out", "out", "--train-scenes", "100", "--heldout-scenes", "20", *steps], empty, env, 600)
    out = empty / "out"
    # the first step: the corpus and the tokenizer trained on its text
    assert (out / "corpus" / "corpus.json").is_file() and (out / "corpus" / "llava" / "text_train.json").is_file()
    counts = json.loads((out / "corpus" / "corpus.json").read_text())["counts"]
    assert counts["train_scenes"] == 100 and counts["heldout_scenes"] == 20
    assert len(list((out / "corpus" / "images" / "train").glob("*.png"))) == counts["distinct_train_scenes"] > 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # then the packaged recipe, read from the installed package
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] == ["lm", "pt", "mtt", "ift"]
    assert all((out / stage / "metrics.jsonl").stat().st_size > 0 for stage in metrics["stages"])
    assert (out / "final" / "config.json").is_file() and (out / "report.html").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["out"]

    after = _repo_files()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files written into the repository: {changed[:20]}"
