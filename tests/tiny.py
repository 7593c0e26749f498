"""Tiny random pieces shared by the tests (built in milliseconds, no network)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from interleaf.config import InterleafConfig
from interleaf.model import InterleafForConditionalGeneration

VOCAB = 120  # base vocabulary of the tiny LMs
IMAGE = VOCAB  # id of <image> (first added token)
CHUNK = VOCAB + 1  # id of <|endofchunk|>

LM_FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                eos_token_id=2),
}


def tiny_lm(family: str = "llama", seed: int = 0):
    data = dict(LM_FAMILIES[family])
    model_type = data.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, **data)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_config(lm_config, **sections) -> InterleafConfig:
    base = dict(
        vision=dict(kind="builtin", image_size=16, patch_size=4, width=24, layers=1, heads=2),
        resampler=dict(depth=1, num_latents=4, heads=2, head_dim=8),
        cross_attention=dict(every_n_layers=1),
        tokens=dict(extra_start=VOCAB, num_extra=2, image_token_id=IMAGE),
    )
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return InterleafConfig(text_config=lm_config, **base)


def tiny_model(family: str = "llama", seed: int = 0, gates: float | None = None, **sections):
    """(interleaf model, the plain LM it wraps as a separate copy)."""
    plain = tiny_lm(family, seed)
    torch.manual_seed(seed + 1)
    model = InterleafForConditionalGeneration(tiny_config(plain.config, **sections), language_model=copy.deepcopy(plain))
    if gates is not None:
        set_gates(model, gates)
    return model.eval(), plain


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for block in model.cross_attention_blocks:
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


def images(batch: int, n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, 3, size, size, generator=g)
