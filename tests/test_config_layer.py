"""The one config reader (interleaf.schema) and the one reader per file kind (interleaf.files).

Every config of interleaf (model sections, training stages, mixtures, evaluation tasks) is a
dataclass read by ``interleaf.schema.read``; these tests pin what each type hint accepts, the exact
text of every kind of error, and that each config follows the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from interleaf.errors import ConfigError, InputError
from interleaf.files import read_json, read_jsonl, read_yaml
from interleaf.schema import read, setting


@dataclass
class Inner:
    rate: float = setting(0.5, ge=0, le=1)
    name: str = setting("x", nonempty=True)


@dataclass
class Outer:
    flag: bool = False
    count: int = setting(1, ge=1)
    lr: float = setting(1e-4, gt=0)
    label: str = "a"
    mode: Literal["fast", "slow"] = "fast"
    limit: int | None = None
    either: str | dict | None = None
    items: list[int] = setting(factory=list, ge=0)
    pair: tuple[float, float] = (0.9, 0.999)
    many: tuple[str, ...] = ()
    table: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    inners: list[Inner] = field(default_factory=list)
    anything: Any = None


@dataclass
class Needs:
    name: str = setting()
    size: int = 1


def _message(data: dict, cls: type = Outer, path: str = "") -> str:
    with pytest.raises(ConfigError) as e:
        read(cls, data, path)
    return str(e.value)


def test_the_reader_on_each_kind_of_type_hint():
    got = read(Outer, {
        "flag": True, "count": 3, "lr": "1e-4", "label": "b", "mode": "slow", "limit": None, "either": {"k": 1},
        "items": (1, 2), "pair": [0.5, 1], "many": ["a", "b", "c"], "table": {"x": "2E-3"},
        "inner": {"rate": 1}, "inners": [{"name": "y"}, None], "anything": [1, {"a": None}],
    })
    assert got.flag is True and got.count == 3 and got.lr == pytest.approx(1e-4) and isinstance(got.lr, float)
    assert (got.label, got.mode, got.limit, got.either) == ("b", "slow", None, {"k": 1})
    assert got.items == [1, 2] and got.pair == (0.5, 1.0) and got.many == ("a", "b", "c")
    assert got.table == {"x": pytest.approx(2e-3)}
    assert got.inner == Inner(rate=1.0) and got.inners == [Inner(name="y"), Inner()]  # null: the defaults
    assert got.anything == [1, {"a": None}]
    assert read(Outer, None) == Outer() and read(Outer, {"either": "text", "limit": 4}).either == "text"


@pytest.mark.parametrize("data, message", [
    ({"lr": "fast"}, "config field 'lr': expected a number, got 'fast'"),
    ({"lr": float("nan")}, "config field 'lr': expected a finite number, got nan"),
    ({"lr": "inf"}, "config field 'lr': expected a number, got 'inf'"),
    ({"lr": True}, "config field 'lr': expected a number, got True"),
    ({"count": 1.5}, "config field 'count': expected an integer, got 1.5"),
    ({"count": "8"}, "config field 'count': expected an integer, got '8'"),
    ({"flag": "yes"}, "config field 'flag': expected true or false, got 'yes'"),
    ({"flag": 1}, "config field 'flag': expected true or false, got 1"),
    ({"label": 3}, "config field 'label': expected a string, got 3"),
    ({"mode": "slwo"}, "config field 'mode': expected one of ['fast', 'slow'], got 'slwo' (did you mean 'slow'?)"),
    ({"mode": "medium"}, "config field 'mode': expected one of ['fast', 'slow'], got 'medium'"),
    ({"limit": "x"}, "config field 'limit': expected an integer, got 'x'"),
    ({"either": 3}, "config field 'either': expected a string or a mapping or null, got 3"),
    ({"items": 3}, "config field 'items': expected a list, got 3"),
    ({"items": [1, "a"]}, "config field 'items[1]': expected an integer, got 'a'"),
    ({"items": [0, -1]}, "config field 'items[1]': must be an integer >= 0, got -1"),
    ({"pair": [0.9]}, "config field 'pair': expected a list of 2 items, got 1: [0.9]"),
    ({"table": []}, "config field 'table': expected a mapping, got []"),
    ({"table": {"a": "b"}}, "config field 'table.a': expected a number, got 'b'"),
    ({"inner": 3}, "config field 'inner': expected a mapping, got 3"),
    ({"inner": {"rate": 1.5}}, "config field 'inner.rate': must be a number >= 0 and <= 1, got 1.5"),
    ({"inner": {"name": ""}}, "config field 'inner.name': must not be empty"),
    ({"inners": [{}, {"rat": 1}]}, "config field 'inners[1].rat': unknown field (did you mean 'rate'? known fields: name, rate)"),
    ({"count": 0}, "config field 'count': must be an integer >= 1, got 0"),
    ({"lr": -1}, "config field 'lr': must be a number > 0, got -1.0"),
    ({"bogus": 1}, "config field 'bogus': unknown field (known fields: anything, count, either, flag, inner, inners, "
                   "items, label, limit, lr, many, mode, pair, table)"),
])
def test_every_kind_of_error_names_the_path(data, message):
    assert _message(data) == message


def test_required_fields_and_the_path_of_a_nested_value():
    assert _message({}, Needs) == "config field 'name': is required"
    assert _message({"name": "a", "size": "x"}, Needs, "sources[2]") == "config field 'sources[2].size': expected an integer, got 'x'"
    assert _message([1], Needs, "sources[2]") == "config field 'sources[2]': expected a mapping, got [1]"
    with pytest.raises(ConfigError) as e:
        read(Needs, "text", name="mixture")
    assert str(e.value) == "config field 'mixture': expected a mapping, got 'text'"


# --------------------------------------------------------------------------- every config, one rule


def test_model_config_follows_the_unified_rules():
    """The model config refused "1e-4" for a float; it now reads it as every config does."""
    from interleaf.config import InterleafConfig

    config = InterleafConfig(cross_attention={"norm_eps": "1e-4", "gate_init_std": "2e-2"}, z_loss="1e-4")
    assert config.xattn_cfg.norm_eps == pytest.approx(1e-4) and config.xattn_cfg.gate_init_std == pytest.approx(0.02)
    assert config.z_loss == pytest.approx(1e-4)
    with pytest.raises(ConfigError) as e:
        InterleafConfig(cross_attention={"norm_eps": "fast"})
    assert str(e.value) == "config field 'cross_attention.norm_eps': expected a number, got 'fast'"
    with pytest.raises(ConfigError) as e:
        InterleafConfig(resampler={"dpeth": 2})
    assert "config field 'resampler.dpeth': unknown field (did you mean 'depth'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        InterleafConfig(vision={"image_std": [0.5, 0, 0.5]})
    assert str(e.value) == "config field 'vision.image_std[1]': must be a number > 0, got 0.0"


def test_training_config_follows_the_unified_rules():
    """The training config already read "1e-4"; its errors now use the same words as the others."""
    from interleaf.training import load_recipe

    stage = load_recipe({"optim": {"lr": "1e-4", "eps": "1e-8"}, "z_loss": "1e-4"}).stages[0]
    assert (stage.optim.lr, stage.optim.eps, stage.z_loss) == (pytest.approx(1e-4), pytest.approx(1e-8), pytest.approx(1e-4))
    with pytest.raises(ConfigError) as e:
        load_recipe({"optim": {"lr": "fast"}})
    assert str(e.value) == "config field 'optim.lr': expected a number, got 'fast'"
    with pytest.raises(ConfigError) as e:
        load_recipe({"stages": [{"name": "a"}, {"name": "b", "optim": {"betas": [0.9, 2]}}]})
    assert str(e.value) == "config field 'stages[1].optim.betas[1]': must be a number >= 0 and <= 1, got 2.0"
    with pytest.raises(ConfigError) as e:
        load_recipe({"optim": {"lrr": 1}})
    assert "config field 'optim.lrr': unknown field (did you mean 'lr'?" in str(e.value)


def test_mixture_follows_the_unified_rules():
    """Mixtures refused "1e-4" for a float; they now read it as every config does."""
    from interleaf.data.mixture import load_mixture

    source = {"name": "a", "format": "llava", "paths": "x.json"}
    mix = load_mixture({"sources": [{**source, "weight": "2e0", "loss_weight": "1e-1"}], "max_bad_fraction": "5e-2"},
                       check_files=False)
    assert (mix.sources[0].weight, mix.sources[0].loss_weight, mix.max_bad_fraction) == (2.0, pytest.approx(0.1), 0.05)
    with pytest.raises(ConfigError) as e:
        load_mixture({"sources": [{**source, "loss_weight": "high"}]}, check_files=False)
    assert str(e.value) == "config field 'sources[0].loss_weight': expected a number, got 'high'"
    with pytest.raises(ConfigError) as e:
        load_mixture({"sources": [{**source, "formt": "llava"}]}, check_files=False)
    assert "config field 'sources[0].formt': unknown field (did you mean 'format'?" in str(e.value)


def test_task_yaml_follows_the_unified_rules(tmp_path):
    """Task YAML passed values unchecked to the dataclass; it is now read by the same reader."""
    from interleaf.evaluation.tasks import load_task_yaml

    path = tmp_path / "t.yaml"
    path.write_text("base: vqav2\nname: mine\nlength_penalty: 1e-1\n")
    assert load_task_yaml(path).length_penalty == pytest.approx(0.1)
    path.write_text("base: vqav2\nname: mine\nmax_new_tokens: many\n")
    with pytest.raises(ConfigError) as e:
        load_task_yaml(path)
    assert str(e.value) == f"config field 'task mine.max_new_tokens': expected an integer, got 'many' (in {path})"
    path.write_text("base: vqav2\nname: mine\nmetrc: cider\n")
    with pytest.raises(ConfigError) as e:
        load_task_yaml(path)
    assert "config field 'metrc': unknown field (did you mean 'metric'?" in str(e.value)


# --------------------------------------------------------------------------- one source of truth


def test_model_config_holds_each_section_once_and_keeps_its_file_format(tmp_path):
    from interleaf.config import InterleafConfig

    config = InterleafConfig(vision={"width": 32, "heads": 4})
    config.vision_cfg.width = 48  # the typed section is the only copy: the dict view and the file follow it
    assert config.vision["width"] == 48 and config.to_dict()["vision"]["width"] == 48
    assert not any(key.endswith("_cfg") for key in config.to_dict())
    config.tokens = {"image_token": "<img>"}
    assert config.tokens_cfg.image_token == "<img>"
    config.save_pretrained(tmp_path)
    again = InterleafConfig.from_pretrained(tmp_path)
    assert again.vision_cfg.width == 48 and again.tokens == config.tokens and again.to_dict() == config.to_dict()
    old = {"model_type": "interleaf", "fusion": "cross_attention", "freeze": "flamingo", "z_loss": 0.0,
           "vision": {"kind": "builtin", "image_mean": [0.5, 0.5, 0.5]}, "resampler": {"depth": 2},
           "cross_attention": {"layers": [1, 0]}, "tokens": {"extra_start": 10, "num_extra": 2}}
    loaded = InterleafConfig.from_dict(old)  # a config.json as interleaf has always written it
    assert loaded.vision_cfg.image_mean == (0.5, 0.5, 0.5) and loaded.xattn_cfg.layers == [0, 1]
    assert loaded.resampler["depth"] == 2 and loaded.tokens_cfg.num_extra == 2


# --------------------------------------------------------------------------- one reader per file kind


def test_file_readers_name_the_file_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(bad, "mixture")
    assert str(e.value).startswith(f"config field 'mixture': {str(bad)!r} is not valid YAML, line 3, column 1: ")
    assert str(e.value).endswith("(fix the YAML syntax there)")
    with pytest.raises(ConfigError) as e:
        read_yaml(tmp_path / "none.yaml", "mixture", "pass the path of a mixture YAML")
    assert str(e.value) == (f"config field 'mixture': file {str(tmp_path / 'none.yaml')!r} does not exist "
                            "(pass the path of a mixture YAML)")
    (tmp_path / "latin.yaml").write_bytes(b"a: \xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text .* \\(save the YAML file as UTF-8\\)"):
        read_yaml(tmp_path / "latin.yaml")
    js = tmp_path / "d.json"
    js.write_text('[1,\n 2,,\n 3]')
    with pytest.raises(InputError) as e:
        read_json(js, "annotations")
    assert str(e.value) == (f"annotations: {str(js)!r} is not valid JSON, line 2, column 4: Expecting value "
                            "(fix the JSON syntax there)")
    with pytest.raises(ConfigError, match=r"^config field 'files.test': .* is not valid JSON, line 2"):
        read_json(js, field="files.test")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(InputError) as e:
        read_jsonl(jl, "questions")
    assert str(e.value).startswith(f"questions: {str(jl)!r} line 3 is not valid JSON (column 8: ")
    jl.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(jl) == [{"a": 1}, {"a": 2}]
