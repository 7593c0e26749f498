"""Property: config parsers accept a config or raise a ConfigError naming the field, whatever they are given.

Training stages and recipes (dicts, YAML files and dotted overrides with random values) and the
model config's sections (vision, resampler, cross-attention, tokens, the LM config).
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_profiles import assert_named_error, examples, sandbox, timeout  # noqa: F401 (sandbox: a fixture)
from interleaf.config import InterleafConfig
from interleaf.errors import ConfigError
from interleaf.training.config import load_recipe

pytestmark = pytest.mark.slow

scalars = (st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats() | st.text(max_size=10)
           | st.sampled_from(["1e-4", "-1", "0", "nan", "inf", "tiny-random", "runs/x", "$NOPE_UNSET", "~/x", "a/b",
                              "~nobody_here/x", "a\x00b"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=8)


def _section(fields: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={k: v | values for k, v in fields.items()}) | values


optim = _section({"lr": st.floats(), "weight_decay": st.floats(), "betas": st.lists(st.floats(), max_size=3),
                  "eps": st.floats(), "schedule": st.sampled_from(["constant", "linear", "cosine"]),
                  "warmup_steps": st.integers(-2, 10), "min_lr_ratio": st.floats(), "clip_grad_norm": st.floats(),
                  "bogus": values})
model = st.sampled_from(["tiny-random", "runs/x", ".", "", "a\x00b"]) | _section({
    "preset": st.sampled_from(["tiny-random", "nope"]), "path": st.sampled_from(["runs/x", "$NOPE_UNSET/x"]),
    "from_stage": st.sampled_from(["a", "b"]), "vision": st.sampled_from(["DIR", "$NOPE_UNSET"]),
    "lm": st.text(max_size=5), "resampler": values, "tokens": values,
})
mixture = _section({"sources": st.lists(_section({
    "name": st.sampled_from(["a", "b"]), "format": st.sampled_from(["pairs", "interleaved", "llava"]),
    "paths": st.sampled_from(["x.tar", "*.tar", "a\x00b", "~nobody_here/x"]), "weight": st.floats(),
    "samples": st.integers(-1, 5)}), max_size=2), "max_bad_fraction": st.floats(), "seed": st.integers(-1, 5)})
stage = _section({
    "name": st.sampled_from(["a", "b", "", "x/y"]), "model": model, "data": mixture | st.sampled_from(["mix.yaml", "a\x00b"]),
    "freeze": st.sampled_from(["flamingo", "all_trainable", "nope"]), "optim": optim,
    "batch_size": st.integers(-1, 9), "grad_accum": st.integers(-1, 4), "max_steps": st.integers(-1, 10),
    "max_length": st.integers(-1, 10), "z_loss": st.floats(), "precision": st.sampled_from(["fp32", "bf16", "fp8"]),
    "gradient_checkpointing": st.booleans(), "checkpoint": _section({"every": st.integers(-1, 5), "keep_last": st.integers(-1, 3)}),
    "max_nonfinite_steps": st.integers(-1, 4), "log_every": st.integers(-1, 4), "seed": st.integers(-1, 4),
    "out": st.sampled_from(["runs/a", "", "/"]), "distributed": _section({"strategy": st.sampled_from(["ddp", "fsdp", "x"])}),
    "bogus": values,
})
recipe = stage | st.builds(lambda defaults, stages: {**(defaults if isinstance(defaults, dict) else {}), "stages": stages},
                           stage, st.lists(stage, max_size=3) | values)
overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["optim.lr", "max_steps", "stages.0.name", "stages.a.optim.lr",
                                                        "model", "model.preset", "data.sources.0.weight", "x..y", "",
                                                        "stages.9.seed", "optim.betas.0"]),
              st.text(max_size=8) | st.sampled_from(["[1, 2", "{a: 1}", "1e-3", "!!python/object:os.system x"]))
    | st.text(max_size=12),
    max_size=3,
)


@timeout(300, 0.1)
@settings(max_examples=examples(300))
@given(config=recipe | values, extra=overrides, from_file=st.booleans())
def test_training_configs_load_or_fail_with_a_config_error(sandbox, config, extra, from_file):
    try:
        if from_file:
            path = sandbox / "stage.yaml"
            path.write_text(yaml.safe_dump(config, allow_unicode=True))
            loaded = load_recipe(path, extra)
        else:
            loaded = load_recipe(config, extra, base_dir=sandbox)
        for s in loaded.stages:
            if s.data is not None:
                s.mixture(check_files=False)
    except Exception as e:  # noqa: BLE001 (the property is about which exceptions escape)
        assert_named_error(e)
        if not isinstance(e, ConfigError):
            raise AssertionError(f"{type(e).__name__} instead of a ConfigError: {e}") from e


vision = _section({"kind": st.sampled_from(["builtin", "clip", "siglip", "x"]), "image_size": st.integers(-1, 64),
                   "patch_size": st.integers(-1, 9), "width": st.integers(-1, 64), "layers": st.integers(-1, 3),
                   "heads": st.integers(-1, 5), "mlp_ratio": st.integers(-1, 4), "conv_stem": st.booleans(),
                   "hf_config": values, "feature_layer": st.integers(-5, 5),
                   "image_mean": st.lists(st.floats(), max_size=4), "image_std": st.lists(st.floats(), max_size=4),
                   "resize": st.sampled_from(["squash", "shortest_edge_crop", "x"])})
resampler = _section({"enabled": st.booleans(), "depth": st.integers(-1, 3), "num_latents": st.integers(-1, 9),
                      "heads": st.integers(-1, 4), "head_dim": st.integers(-1, 8), "ff_mult": st.integers(-1, 4),
                      "qk_norm": st.booleans(), "activation": st.sampled_from(["gelu", "relu", "x"])})
xattn = _section({"every_n_layers": st.integers(-1, 3), "layers": st.lists(st.integers(-1, 4), max_size=3),
                  "heads": st.integers(-1, 4), "head_dim": st.integers(-1, 8), "qk_norm": st.booleans(),
                  "norm": st.sampled_from(["rms", "layer", "x"]), "ffn": st.sampled_from(["gated", "plain", "x"]),
                  "ffn_dim": st.integers(-1, 8), "activation": st.sampled_from(["silu", "gelu", "x"]),
                  "gate_init": st.sampled_from(["zeros", "ones", "normal", "x"]), "gate_init_std": st.floats(),
                  "gate_shape": st.sampled_from(["scalar", "vector", "x"]), "ffn_without_image": st.booleans(),
                  "norm_eps": st.floats()})
tokens = _section({"prompt_format": st.sampled_from(["openflamingo", "idefics", "x"]), "image_token": st.text(max_size=4),
                   "end_of_chunk_token": st.text(max_size=4), "add_end_of_utterance": st.booleans(),
                   "extra_start": st.integers(-1, 5), "num_extra": st.integers(-1, 5), "image_token_id": st.integers(-1, 5)})
text_config = st.none() | values | st.fixed_dictionaries(
    {"model_type": st.sampled_from(["llama", "gpt2", "nope"]) | values},
    optional={"hidden_size": st.integers(-1, 64) | values, "num_hidden_layers": st.integers(-1, 3) | values},
)
model_configs = st.fixed_dictionaries({}, optional={
    "fusion": st.sampled_from(["cross_attention", "token_insertion"]) | values, "vision": vision,
    "resampler": resampler, "cross_attention": xattn, "tokens": tokens, "text_config": text_config,
    "freeze": st.sampled_from(["flamingo", "all_trainable", "x"]) | values, "z_loss": st.floats() | values,
})


@timeout(300, 0.1)
@settings(max_examples=examples(300))
@given(kwargs=model_configs)
def test_model_configs_build_or_fail_with_a_config_error(sandbox, kwargs):
    try:
        config = InterleafConfig(**kwargs)
        InterleafConfig.from_dict(config.to_dict())  # what config.json holds reads back
    except Exception as e:  # noqa: BLE001
        assert_named_error(e)
        if not isinstance(e, ConfigError):
            raise AssertionError(f"{type(e).__name__} instead of a ConfigError: {e}") from e
