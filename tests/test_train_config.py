"""Training configs: validation errors name the dotted field and the file; dotted overrides; recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from interleaf.errors import ConfigError
from interleaf.training import apply_overrides, llava_mixture, load_recipe, parse_override


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


STAGE = {"model": {"preset": "tiny-random"}, "data": {"sources": [{"name": "a", "format": "llava", "paths": "x.json"}]}}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"schedule": "step"}}, "optim.schedule"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"optim": {"warmup": 3}}, "optim.warmup"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 6, "grad_accum": 4}, "grad_accum"),
        ({"precision": "fp16"}, "precision"),
        ({"freeze": "everything"}, "freeze"),
        ({"checkpoint": {"every": 0}}, "checkpoint.every"),
        ({"distributed": {"strategy": "zero3"}}, "distributed.strategy"),
        ({"model": {"preset": "tiny-random", "path": "runs/x"}}, "model"),
        ({"lr": 0.1}, "lr"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ],
)
def test_errors_name_the_field_and_the_file(tmp_path, change, field):
    path = _write(tmp_path / "stage.yaml", {**STAGE, **change})
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert e.value.field == field
    assert "stage.yaml" in str(e.value)


def test_mixture_errors_are_prefixed_with_data(tmp_path):
    path = _write(tmp_path / "s.yaml", {**STAGE, "data": {"sources": [{"name": "a", "format": "tarball", "paths": "x"}]}})
    stage = load_recipe(path).stages[0]
    with pytest.raises(ConfigError) as e:
        stage.mixture(check_files=False)
    assert e.value.field == "data.sources[0].format"
    assert "s.yaml" in str(e.value)


def test_overrides_are_yaml_scalars_and_dotted():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", pytest.approx(3e-4))
    assert parse_override("gradient_checkpointing=true") == ("gradient_checkpointing", True)
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    assert parse_override("out=runs/e1") == ("out", "runs/e1")
    with pytest.raises(ConfigError):
        parse_override("max_steps")
    recipe = load_recipe(STAGE, ["optim.lr=3e-4", "max_steps=7", "checkpoint.every=2", "optim.schedule=linear"])
    s = recipe.stages[0]
    assert (s.optim.lr, s.max_steps, s.checkpoint.every, s.optim.schedule) == (pytest.approx(3e-4), 7, 2, "linear")
    with pytest.raises(ConfigError) as e:
        load_recipe(STAGE, ["optim.lr=fast"])
    assert e.value.field == "optim.lr"


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "mix.yaml", {"sources": [{"name": "a", "format": "llava", "paths": "v.json"}]})
    (tmp_path / "data" / "v.json").write_text("[]")
    path = _write(tmp_path / "stage.yaml", {"data": "data/mix.yaml"})
    mixture = load_recipe(path, ["max_length=64"]).stages[0].mixture()
    assert mixture.sources[0].paths == [str((tmp_path / "data" / "v.json").resolve())]
    assert mixture.max_length == 64


def test_recipe_stages_defaults_from_stage_and_stage_overrides(tmp_path):
    recipe_data = {
        "out": "runs/demo", "max_steps": 10, "optim": {"lr": 1e-3},
        "stages": [
            {"name": "pt", **STAGE, "freeze": "flamingo"},
            {"name": "sft", "model": {"from_stage": "pt"}, "data": STAGE["data"], "optim": {"schedule": "linear"}},
        ],
    }
    recipe = load_recipe(_write(tmp_path / "r.yaml", recipe_data), ["stages.sft.max_steps=3", "seed=5"])
    pt, sft = recipe.stages
    assert (pt.out, sft.out) == (str(Path("runs/demo/pt")), str(Path("runs/demo/sft")))
    assert (pt.max_steps, sft.max_steps) == (10, 3)
    assert (pt.seed, sft.seed) == (5, 5)
    assert sft.optim.lr == pytest.approx(1e-3) and sft.optim.schedule == "linear"  # defaults merged per key
    assert sft.model.from_stage == "pt"
    bad = {**recipe_data, "stages": [recipe_data["stages"][1], recipe_data["stages"][0]]}
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path / "bad.yaml", bad))
    assert e.value.field == "stages[0].model.from_stage"
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe_data, ["stages.nope.max_steps=3"])
    assert "nope" in str(e.value)


def test_stage_config_round_trips_through_to_dict():
    stage = load_recipe(STAGE, ["optim.betas=[0.8, 0.9]"]).stages[0]
    again = load_recipe(stage.to_dict()).stages[0]
    assert again.to_dict() == stage.to_dict()


def test_llava_mixture_is_one_llava_source(tmp_path):
    (tmp_path / "my.json").write_text("[]")
    mix = llava_mixture(tmp_path / "my.json", tmp_path)
    assert mix["sources"][0]["format"] == "llava"
    assert mix["sources"][0]["images_root"] == str(tmp_path.resolve())
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}
