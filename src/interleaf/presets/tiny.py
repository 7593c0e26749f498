"""Tiny presets: ``tiny-random`` builds in milliseconds with random weights, for tests and quick trials."""

from __future__ import annotations

from .registry import Preset, register

register(
    Preset(
        name="tiny-random",
        description="random weights, built-in ViT (32 px) + 2-layer LLaMA (64 wide); builds in milliseconds",
        vision=dict(kind="builtin", image_size=32, patch_size=8, width=32, layers=1, heads=2),
        resampler=dict(depth=1, num_latents=8, heads=2, head_dim=16),
        cross_attention=dict(every_n_layers=1),
        text_config=dict(
            model_type="llama",
            vocab_size=None,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    )
)
