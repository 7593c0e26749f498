"""The seeds' architectures as presets, built on the meta device at their real sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text

import interleaf
from interleaf.convert import idefics_to_interleaf_config
from interleaf.errors import ConfigError

SEEDS = [
    "idefics-9b", "idefics-80b", "openflamingo-3b", "openflamingo-4b", "openflamingo-9b",
    "infimm-zephyr-7b", "infimm-llama2-13b", "infimm-vicuna-13b",
]


def idefics_config(hidden: int, intermediate: int, layers: int, heads: int) -> IdeficsConfig:
    """The released IDEFICS configs (HuggingFaceM4/idefics-9b, -80b), written out."""
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, cross_layer_interval=4, qk_layer_norms=True,
        use_resampler=True, alpha_type="float", alpha_initializer="zeros",
        rms_norm_eps=1e-6 if layers == 32 else 1e-5,
        vision_config=dict(embed_dim=1280, image_size=224, patch_size=14, num_hidden_layers=32,
                           num_attention_heads=16, intermediate_size=5120, hidden_act="gelu"),
        perceiver_config=dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                              resampler_head_dim=96, qk_layer_norms_perceiver=True),
    )


@pytest.mark.parametrize(
    "name, dims, expected",
    [
        ("idefics-9b", (4096, 11008, 32, 32), 8_929_679_632),
        ("idefics-80b", (8192, 22016, 80, 64), 79_967_843_624),
    ],
)
def test_idefics_presets_have_the_released_parameter_counts(name, dims, expected):
    model, _ = interleaf.build(name, device="meta")
    assert model.num_parameters() == expected
    config = idefics_config(*dims)
    with torch.device("meta"):
        reference = IdeficsForVisionText2Text(config)
    assert reference.num_parameters() == expected
    # the preset is exactly what the converter makes of the released config
    converted = idefics_to_interleaf_config(config)
    assert model.config.cross_attention == converted.cross_attention
    assert model.config.resampler == converted.resampler
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps"):
        assert getattr(model.config.text_config, key) == getattr(converted.text_config, key), key
    assert model.config.vision_cfg.width == 1280 and model.config.vision_cfg.image_size == 224


@pytest.mark.parametrize(
    "name, model_type, width, layers, every",
    [
        ("openflamingo-3b", "mpt", 2048, 24, 1),
        ("openflamingo-4b", "gpt_neox", 2560, 32, 2),
        ("openflamingo-9b", "mpt", 4096, 32, 4),
    ],
)
def test_openflamingo_presets(name, model_type, width, layers, every):
    model, _ = interleaf.build(name, device="meta")
    text = model.config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers) == (model_type, width, layers)
    assert model.config.xattn_cfg.layer_indices(layers) == [i for i in range(layers) if (i + 1) % every == 0]
    assert len(model.cross_attention_blocks) == layers // every
    block = model.cross_attention_blocks[0]
    assert (block.heads, block.head_dim, block.k_proj.in_features) == (8, 64, 1024)  # ViT-L/14 width
    assert model.resampler.latents.shape == (64, 1024)
    vision = model.config.vision_cfg
    assert vision.drop_cls_token and vision.post_layernorm and vision.num_patches == 256


def test_the_infimm_preset_without_a_public_config_says_so():
    with pytest.raises(ConfigError, match=r"EVA-CLIP .*not established from public facts"):
        interleaf.build("infimm-llama2-13b", device="meta")


def test_every_seed_preset_is_listed():
    listed = interleaf.presets()
    assert set(SEEDS) <= set(listed)
    assert "EVA-CLIP" in listed["infimm-zephyr-7b"]


def test_an_unbuildable_tower_is_a_declared_state_and_build_refuses_it_naming_the_preset_and_the_fix():
    from interleaf.presets import get_preset

    assert [n for n in SEEDS if get_preset(n).unavailable] == ["infimm-llama2-13b"]
    with pytest.raises(ConfigError) as caught:
        interleaf.build("infimm-llama2-13b", device="meta")
    assert caught.value.field == "vision"
    assert "preset 'infimm-llama2-13b'" in str(caught.value)
    assert "interleaf.build(vision=<local CLIP, SigLIP or EVA-CLIP directory>" in str(caught.value)


# llava-hf/llava-1.5-7b-hf and llava-hf/llava-1.5-13b-hf config.json, written out (text_config as the LLMs'
# own config.json: lmsys/vicuna-7b-v1.5 and lmsys/vicuna-13b-v1.5 with llava-hf's padded vocabulary of 32064;
# vision_config: openai/clip-vit-large-patch14-336). The reference figure is transformers'
# LlavaForConditionalGeneration built from these values on the meta device, computed in the test itself.
LLAVA_15_TEXT = {
    "llava-1.5-7b": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0),
    "llava-1.5-13b": dict(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                          num_attention_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0),
}


@pytest.mark.parametrize("name", list(LLAVA_15_TEXT))
def test_llava_15_presets_have_the_released_parameter_counts(name):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from interleaf.convert.llava import llava_to_interleaf_config
    from interleaf.presets.seeds import LLAVA_15_CHAT_TEMPLATE

    released = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                       hidden_act="quick_gelu"),
        text_config=LlamaConfig(**LLAVA_15_TEXT[name]), image_token_index=32000, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    with torch.device("meta"):
        reference = LlavaForConditionalGeneration(released).num_parameters()
    model, processor = interleaf.build(name, device="meta")
    assert next(model.parameters()).is_meta and processor is None
    assert model.num_parameters() == reference  # 7,063,427,072 and 13,351,494,656
    converted = llava_to_interleaf_config(released)  # the preset is what the converter makes of the release
    assert model.config.projector == converted.projector and model.config.insertion == converted.insertion
    assert model.config.tokens_cfg.image_seq_length == converted.tokens_cfg.image_seq_length == 576
    assert model.config.vision_cfg.feature_layer == converted.vision_cfg.feature_layer == -2
    assert "USER:" in LLAVA_15_CHAT_TEMPLATE and "ASSISTANT:" in LLAVA_15_CHAT_TEMPLATE
