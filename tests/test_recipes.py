"""The packaged recipes (interleaf/recipes/) by name: the resolver, `interleaf recipes`, loading by name."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from typer.testing import CliRunner

from interleaf.cli import app, main
from interleaf.errors import ConfigError
from interleaf.recipes import ROOT, available, describe, resolve
from interleaf.training import load_recipe

NAMES = ["demo", "demo_token_insertion", "dpo", "pretrain", "seeds/idefics", "seeds/idefics/instruct", "seeds/infimm",
         "seeds/llava",
         "seeds/openflamingo/pretrain", "seeds/xgen_mm/sft", "sft_llava"]


def test_the_names_are_the_recipes_and_data_folders_hold_the_mixtures():
    assert list(available()) == NAMES  # sorted; a recipe added later is added here on purpose
    for path in ROOT.rglob("*.yaml"):
        is_mixture = "sources" in (yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        assert is_mixture == ("data" in path.relative_to(ROOT).parts[:-1]), path
    assert set(available().values()) == {p for p in ROOT.rglob("*.yaml") if "data" not in p.relative_to(ROOT).parts[:-1]}


def test_a_name_with_or_without_yaml_and_a_folder_name_mean_the_packaged_file():
    assert resolve("sft_llava") == resolve("sft_llava.yaml") == ROOT / "sft_llava.yaml"
    assert resolve("demo") == resolve("demo/recipe.yaml") == ROOT / "demo" / "recipe.yaml"
    assert resolve("seeds/idefics") == resolve("seeds/idefics/recipe") == ROOT / "seeds" / "idefics" / "recipe.yaml"
    assert resolve("seeds/idefics/instruct.yaml") == ROOT / "seeds" / "idefics" / "instruct.yaml"
    assert resolve(str(ROOT / "pretrain.yaml")) == ROOT / "pretrain.yaml"  # a path to the packaged file itself


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft_llava.yaml").write_text("model: {preset: tiny-random}\n")
    assert resolve("sft_llava.yaml").resolve() == tmp_path / "sft_llava.yaml"
    assert resolve("sft_llava") == ROOT / "sft_llava.yaml"  # no file of that exact name here: the packaged one
    (tmp_path / "seeds" / "idefics").mkdir(parents=True)  # a folder is not a file: the name still resolves
    assert resolve("seeds/idefics") == ROOT / "seeds" / "idefics" / "recipe.yaml"


@pytest.mark.parametrize("name", ["sft-llava", "seeds/nope", "data/pretrain_mixture", "my/recipe.yaml"])
def test_an_unknown_name_lists_the_packaged_names_and_says_a_path_works(name):
    with pytest.raises(ConfigError) as e:
        resolve(name)
    msg = str(e.value)
    assert msg.startswith(f"config field 'config': {name!r} is not an existing file and not the name of a packaged recipe")
    assert f"packaged recipes: {', '.join(NAMES)} " in msg
    assert "`interleaf recipes`" in msg and "or the path of your own recipe YAML" in msg


def test_a_folder_path_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder, not a YAML file and not the name of a packaged recipe"):
        resolve(tmp_path)


def test_every_packaged_recipe_loads_by_name(monkeypatch, tmp_path):
    text = "\n".join(p.read_text(encoding="utf-8") for p in ROOT.rglob("*.yaml"))
    for var in set(re.findall(r"\$\{(\w+)\}", text)) - set(os.environ):
        monkeypatch.setenv(var, str(tmp_path / var))
    for name in NAMES:
        recipe = load_recipe(name)
        assert recipe.source == str(available()[name])  # errors name the packaged file
        assert recipe.stages
        for stage in recipe.stages:  # relative data paths are read from the recipe's own folder
            if stage.data is not None:
                assert stage.mixture(check_files=False).sources


def test_recipes_command_lists_every_name_with_its_stages_description_and_path():
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3 * len(NAMES)
    infos = {i.name: i for i in describe()}
    for k, name in enumerate(NAMES):
        head, description, path = lines[3 * k: 3 * k + 3]
        assert head == f"{name}  (stages: {', '.join(infos[name].stages)})"
        assert description == f"    {infos[name].description}" and len(infos[name].description) > 20
        assert path == f"    {available()[name]}"
    assert lines[:2] == ["demo  (stages: lm, pt, mtt, ift)",
                         "    The demo: a tiny vision-language model trained from scratch on the synthetic corpus"]
    assert "sft_llava  (stages: sft)" in lines


def test_train_command_with_an_unknown_name_exits_with_the_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "sft_lava"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'sft_lava' is not an existing file and not the name of a packaged recipe" in err and "sft_llava" in err


def test_a_relative_data_folder_from_the_environment_is_read_from_the_working_directory(tmp_path, monkeypatch):
    """A packaged recipe's folder is inside the installed package: `PRETRAIN_DATA_DIR=shards` means ./shards."""
    (tmp_path / "shards" / "pairs").mkdir(parents=True)
    (tmp_path / "shards" / "pairs" / "train-000000.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRETRAIN_DATA_DIR", "shards")
    (stage,) = load_recipe("pretrain").stages
    pairs, documents = stage.mixture(check_files=False).sources
    assert pairs.files() == [str(tmp_path / "shards" / "pairs" / "train-000000.tar")]
    assert documents.paths == [str(tmp_path / "shards" / "interleaved" / "train-*.tar")]
    # a path written in the YAML itself stays relative to the YAML's folder
    assert stage.data == str(ROOT / "data" / "pretrain_mixture.yaml")
