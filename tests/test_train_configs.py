"""Every YAML shipped in interleaf/recipes/ (recursively) loads and validates: recipes added later are covered."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from interleaf.data.mixture import load_mixture
from interleaf.recipes import ROOT as CONFIGS
from interleaf.training import load_recipe

FILES = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def test_the_generic_recipes_are_shipped():
    names = {p.relative_to(CONFIGS).as_posix() for p in FILES}
    assert {"pretrain.yaml", "sft_llava.yaml"} <= names


def _placeholder_env(path: Path, monkeypatch, tmp_path: Path) -> None:
    """Environment variables a config reads (``${NAME}``) are set at run time; give unset ones a folder."""
    texts = [path.read_text(encoding="utf-8")] + [p.read_text(encoding="utf-8") for p in path.parent.rglob("*.yaml")]
    for name in set(re.findall(r"\$\{(\w+)\}", "\n".join(texts))):
        if name not in os.environ:
            monkeypatch.setenv(name, str(tmp_path))


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(CONFIGS).as_posix() for p in FILES])
def test_config_validates(path, monkeypatch, tmp_path):
    _placeholder_env(path, monkeypatch, tmp_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "sources" in data:  # a data mixture
        assert load_mixture(path, check_files=False).sources
        return
    recipe = load_recipe(path)
    assert recipe.stages
    for stage in recipe.stages:
        if stage.data is not None:  # data given in the file (else: --data at run time)
            assert stage.mixture(check_files=False).sources
