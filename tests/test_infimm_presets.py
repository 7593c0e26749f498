"""The InfiMM presets against the released configs and the released parameter counts.

References (the reference notes on token insertion, InfiMM part and "Released sizes"):

- ``config.json`` of Infi-MM/infimm-zephyr, written out below (its ``visual`` dict whole, its
  ``language`` dict's dimensions); of Infi-MM/infimm-vicuna13b, the values the notes record.
- The released parameter counts: InfiMM's public modelling code instantiated on the meta device from
  those configs (unique parameters, EVA's unused final norm and head included), checked against the
  size of the published ``pytorch_model.bin`` (2 bytes x count, to 3 significant figures):
  infimm-zephyr 9,840,832,224 = tower 304,432,832 + perceiver 63,019,008 + 16 cross-attention
  blocks x 139,476,994 + LM 7,241,748,480; infimm-vicuna13b 19,710,920,980 = tower 4,350,556,928 +
  perceiver 176,343,552 + 10 blocks x 216,813,570 + LM 13,015,884,800.

The presets build with interleaf's EVA-CLIP vision kind; everything but the tower is also counted
on its own, with a stand-in tower of the same width (its own parameters left out of the count).
"""

from __future__ import annotations

import pytest

import interleaf
from interleaf.config import VisionConfig
from interleaf.errors import ConfigError
from interleaf.model.eva_clip import eva_vision_config
from interleaf.presets import get_preset

ZEPHYR_VISUAL = {  # Infi-MM/infimm-zephyr config.json, "visual"
    "image_size": 336, "layers": 24, "width": 1024, "head_width": 64, "patch_size": 14, "mlp_ratio": 2.6667,
    "eva_model_name": "eva-clip-l-14-336", "drop_path_rate": 0.0, "xattn": False, "fusedLN": True, "rope": True,
    "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True, "embed_dim": 768,
}
ZEPHYR_LANGUAGE = {  # Infi-MM/infimm-zephyr config.json, "language" (HuggingFaceH4/zephyr-7b-beta, 32002 rows)
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "hidden_act": "silu", "rope_theta": 10000.0,
}
VICUNA_VISUAL = {  # Infi-MM/infimm-vicuna13b config.json, "visual", as the reference notes record it
    "image_size": 224, "layers": 64, "width": 1792, "head_width": 112, "patch_size": 14,
    "mlp_ratio": 8.571428571428571, "eva_model_name": "eva-clip-4b-14-x", "postnorm": True, "xattn": False,
    "fusedLN": False, "embed_dim": 1024, "patch_dropout": 0.0,
}
VICUNA_LANGUAGE = {  # Vicuna-13B v1.5: Llama, 5120 wide, 40 layers, 40 heads, 13824 (32002 rows)
    "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
    "num_attention_heads": 40, "num_key_value_heads": 40, "tie_word_embeddings": False,
}
RELEASED = {
    # name: (visual, language, cross_attn_every_n_layers, blocks before layers, parameters)
    "infimm-zephyr-7b": (ZEPHYR_VISUAL, ZEPHYR_LANGUAGE, 2, list(range(1, 32, 2)), dict(
        total=9_840_832_224, tower=304_432_832, perceiver=63_019_008, block=139_476_994, lm=7_241_748_480)),
    "infimm-vicuna-13b": (VICUNA_VISUAL, VICUNA_LANGUAGE, 4, list(range(3, 40, 4)), dict(
        total=19_710_920_980, tower=4_350_556_928, perceiver=176_343_552, block=216_813_570, lm=13_015_884_800)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_every_field_is_the_released_configs(name):
    visual, language, every, _, _ = RELEASED[name]
    preset = get_preset(name)
    # the preset's tower is exactly what interleaf makes of the released "visual" dict
    assert VisionConfig(**dict(preset.vision)) == eva_vision_config(visual)
    assert preset.vision["image_size"] == visual["image_size"] and preset.vision["patch_size"] == 14
    assert preset.vision["resize"] == "shortest_edge_crop"
    assert preset.vision["image_mean"] == (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
    assert preset.vision["image_std"] == (0.26862954, 0.26130258, 0.27577711)
    for key, value in language.items():
        assert preset.text_config[key] == value, key
    # 32002 rows in the LM, <|endofchunk|> 32000 and <image> 32001 among them (eoc_token_id, image_token_id)
    assert preset.text_config["vocab_size"] == 32002
    assert preset.tokens == dict(prompt_format="openflamingo", image_token_id=32001)
    assert preset.cross_attention["skip_rows_without_image"]  # InfiMM's per-row flag
    # the perceiver as InfiMM's code builds it (the model card's 16 heads x 96 is not what loads the weights)
    assert preset.resampler == dict(depth=6, num_latents=64, heads=8, head_dim=64, ff_mult=4, activation="gelu")
    xattn = preset.cross_attention
    assert xattn["every_n_layers"] == every
    assert (xattn["heads"], xattn["head_dim"], xattn["norm"], xattn["ffn"], xattn["activation"]) == (
        8, 64, "layer", "plain", "gelu")
    assert xattn["gate_init"] == "zeros" and xattn["norm_eps"] == 1e-5


def _without_tower(name: str):
    """The preset built on the meta device with a stand-in tower of the EVA tower's width."""
    preset = get_preset(name)
    width = preset.vision["width"]
    model, _ = interleaf.build(
        vision=dict(kind="builtin", image_size=14, patch_size=14, width=width, layers=1, heads=16),
        lm=dict(preset.text_config), tokenizer="none", resampler=dict(preset.resampler),
        cross_attention=dict(preset.cross_attention), tokens=dict(preset.tokens), device="meta",
    )
    return model


@pytest.mark.parametrize("name", list(RELEASED))
def test_everything_but_the_tower_has_the_released_parameter_counts(name):
    _, _, _, layers, want = RELEASED[name]
    model = _without_tower(name)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    tower = count(model.vision_tower)
    assert model.num_parameters() - tower == want["total"] - want["tower"]  # 9,536,399,392 / 15,360,364,052
    assert count(model.resampler) == want["perceiver"]
    assert model.config.xattn_cfg.layer_indices(model.config.text_config.num_hidden_layers) == layers
    assert [count(block) for block in model.cross_attention_blocks] == [want["block"]] * len(layers)
    lm = model.num_parameters() - tower - want["perceiver"] - want["block"] * len(layers)
    assert lm == want["lm"]
    assert model.language_model.get_input_embeddings().num_embeddings == 32002


@pytest.mark.parametrize("name", list(RELEASED))
def test_the_presets_have_the_released_parameter_counts(name):
    model, processor = interleaf.build(name, device="meta")
    assert processor is None and next(model.parameters()).is_meta
    assert model.num_parameters() == RELEASED[name][4]["total"]  # 9,840,832,224 / 19,710,920,980
    assert sum(p.numel() for p in model.vision_tower.parameters()) == RELEASED[name][4]["tower"]


def test_the_llama2_13b_preset_says_its_tower_is_not_established():
    preset = get_preset("infimm-llama2-13b")
    assert preset.unavailable and preset.vision == {}
    assert "not established from public facts" in preset.unavailable
    assert "not established from public facts" in interleaf.presets()["infimm-llama2-13b"]
    assert "every_n_layers" not in preset.cross_attention  # the interval is not known either
    with pytest.raises(ConfigError, match="not established from public facts"):
        interleaf.build("infimm-llama2-13b", device="meta")
