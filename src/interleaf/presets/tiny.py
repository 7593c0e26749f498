"""Tiny presets, built in milliseconds with random weights, for tests and quick trials.

``tiny-random``: the cross-attention family. ``tiny-llava``: the token-insertion family, LLaVA's
architecture (a CLIP tower read at its penultimate layer without the class token, a two-layer
MLP projector, one ``<image>`` per vision token). ``tiny-llava-next``: LLaVA-NeXT's architecture,
``tiny-llava`` with any-resolution tiling (each image a base view and a grid of crops, packed with
a learned ``image_newline``; its token count depends on its size).
"""

from __future__ import annotations

from .registry import Preset, register

# The tiny LM every tiny preset shares (its vocabulary is the tokenizer's).
TINY_LLAMA = dict(model_type="llama", vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
# A tiny CLIP tower as LLaVA uses it: the penultimate layer, the class token dropped (32 px, 16 tokens).
TINY_CLIP = dict(kind="clip", feature_layer=-2, drop_cls_token=True,
                 hf_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8))

register(
    Preset(
        name="tiny-random",
        description="random weights, built-in ViT (32 px) + 2-layer LLaMA (64 wide); builds in milliseconds",
        vision=dict(kind="builtin", image_size=32, patch_size=8, width=32, layers=1, heads=2),
        resampler=dict(depth=1, num_latents=8, heads=2, head_dim=16),
        cross_attention=dict(every_n_layers=1),
        text_config=dict(TINY_LLAMA),
    )
)

register(
    Preset(
        name="tiny-llava",
        description="random weights, LLaVA's architecture: CLIP (32 px, 16 tokens) + MLP projector + 2-layer LLaMA",
        vision=dict(TINY_CLIP),
        resampler={},
        cross_attention={},
        fusion="token_insertion",
        projector=dict(kind="mlp2x_gelu"),
        insertion=dict(placement="expand"),
        tokens=dict(prompt_format="llava"),
        freeze="projector",
        text_config=dict(TINY_LLAMA),
    )
)

register(
    Preset(
        name="tiny-llava-next",
        description="random weights, LLaVA-NeXT's architecture: tiny-llava with any-resolution tiling (32 px views, "
        "LLaVA-v1.6's five grids) and a learned image_newline",
        vision=dict(TINY_CLIP),
        resampler={},
        cross_attention={},
        fusion="token_insertion",
        projector=dict(kind="mlp2x_gelu"),
        # grids (height, width) in px: 1x2, 2x1, 2x2, 3x1, 1x3 views of 32 px, as llava-v1.6's pinpoints at 336
        insertion=dict(placement="expand", anyres=dict(convention="llava_next", base_size=32, patch_size=8)),
        tokens=dict(prompt_format="llava"),
        freeze="projector",
        text_config={**TINY_LLAMA, "max_position_embeddings": 1024},  # anyres images take more tokens
    )
)
