"""Tiny random pieces shared by the tests (built in milliseconds, no network).

The one place a test builds a tiny model by hand:

- ``tiny_lm(family, ...)``: a random causal LM of any family in ``LM_FAMILIES`` (a new family is
  one entry there), with any config field overridden;
- ``tiny_model(family, ...)``: that LM wrapped in interleaf's cross-attention model;
- ``tiny_preset(...)``: the packaged ``tiny-random`` preset, optionally with open gates and a louder
  resampler (so that an answer depends on the images);
- ``tiny_clip(...)``: a random CLIP vision tower;
- ``tiny_idefics(...)``: a random transformers IDEFICS over its options, with the tiny tokenizer;
- ``tiny_llava(...)``: a random transformers LLaVA (CLIP tower + LLaMA) with the tiny tokenizer.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import interleaf
from interleaf.config import InterleafConfig
from interleaf.model import InterleafForConditionalGeneration
from interleaf.processing import build_tiny_tokenizer

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


def tiny_lm(family: str = "llama", seed: int | None = 0, *, vocab_size: int = VOCAB, **overrides):
    """A random causal LM of ``family`` (a key of ``LM_FAMILIES``), in eval mode.

    ``overrides`` replace or add fields of the family's config (e.g. ``num_key_value_heads=4`` or
    a tokenizer's ``pad_token_id``). ``seed=None`` draws the weights from the caller's random state
    as it is, without seeding it.
    """
    data = {**LM_FAMILIES[family], **overrides}
    model_type = data.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, **data)
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_clip(seed: int | None = None, **overrides) -> CLIPVisionModel:
    """A random CLIP vision tower (2 layers, width 32); ``overrides`` replace config fields."""
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    if seed is not None:
        torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**{**fields, **overrides}))


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


def tiny_preset(seed: int = 0, *, gates: float | None = None, resampler_scale: float | None = None, **options):
    """``interleaf.build("tiny-random", seed=seed, **options)``: (model, processor).

    ``gates`` fills every cross-attention gate; ``resampler_scale`` multiplies the resampler's
    linear weights (a louder resampler, whose output changes the answer).
    """
    model, processor = interleaf.build("tiny-random", seed=seed, **options)
    with torch.no_grad():
        if resampler_scale is not None:
            for module in model.resampler.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(resampler_scale)
    if gates is not None:
        set_gates(model, gates)
    return model, processor


IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def idefics_tokenizer(text: str | None = None):
    tok = build_tiny_tokenizer(text)
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS_TOKENS})
    return tok, base


def tiny_idefics(
    *, qk=True, alpha="normal", alpha_type="float", interval=1, resampler=True, extra=True, layers=4, seed=0,
    tokenizer_text=None,
):
    """A random IDEFICS with the tiny tokenizer; ``extra``: the IDEFICS tokens are decoupled rows."""
    tok, base = idefics_tokenizer(tokenizer_text)
    vocab, additional = (base, len(IDEFICS_TOKENS)) if extra else (len(tok), 0)
    config = IdeficsConfig(
        vocab_size=vocab, additional_vocab_size=additional, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, cross_layer_interval=interval, qk_layer_norms=qk,
        use_resampler=resampler, alpha_initializer=alpha, alphas_initializer_range=1.0, alpha_type=alpha_type,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=256,
        vision_config=dict(embed_dim=32, image_size=30, patch_size=5, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                              qk_layer_norms_perceiver=qk),
    )
    torch.manual_seed(seed)
    if alpha == "normal" and alpha_type == "float":
        # transformers cannot build this combination (torch.normal(size=(1)) is given an int): build
        # with ones, then draw the gates as "normal" would.
        config.alpha_initializer = "ones"
        model = IdeficsForVisionText2Text(config)
        for layer in model.model.gated_cross_attn_layers:
            torch.nn.init.normal_(layer.alpha_cross_attn, std=1.0)
            torch.nn.init.normal_(layer.alpha_dense, std=1.0)
        model.config.alpha_initializer = "normal"
        return model.eval(), tok
    return IdeficsForVisionText2Text(config).eval(), tok


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for block in model.cross_attention_blocks:
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


def images(batch: int, n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, 3, size, size, generator=g)


LLAVA_IMAGE_TOKEN = "<image>"


def tiny_llava(
    seed: int = 0, *, feature_layer: int | list[int] = -2, strategy: str = "default", image_size: int = 28,
    patch_size: int = 14, projector_bias: bool = True, tie_word_embeddings: bool = False, init: float = 0.2,
):
    """A random transformers ``LlavaForConditionalGeneration`` (CLIP + LLaMA) and the tiny tokenizer
    with ``<image>`` added (an ordinary row of the LM's vocabulary, as in llava-hf checkpoints).

    ``init`` is the LM's initializer range: larger than transformers' 0.02 so that the images and
    the text change the logits clearly and greedy answers are not constant.
    """
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=init, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=tie_word_embeddings)
    per_image = (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN), image_seq_length=per_image,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         multimodal_projector_bias=projector_bias, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), tok


def tiny_llava_next(
    seed: int = 0, *, feature_layer: int | list[int] = -2, image_size: int = 28, patch_size: int = 14,
    pinpoints: list[list[int]] | None = None, tie_word_embeddings: bool = False, init: float = 0.2,
):
    """A random transformers ``LlavaNextForConditionalGeneration`` (CLIP + LLaMA, pinpoints (height,
    width) in multiples of ``image_size``) and the tiny tokenizer with ``<image>`` added.

    The default pinpoints are LLaVA-v1.6's five grids (1x2, 2x1, 2x2, 3x1, 1x3 crops) at the tiny
    tower's size. ``init``: as :func:`tiny_llava`.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    s = image_size
    pinpoints = pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=init, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=tie_word_embeddings)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                             image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=feature_layer,
                             vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                             tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval(), tok


def tiny_llava_next_processor(reference, tok):
    """transformers' ``LlavaNextProcessor`` (its PIL image processor) for a :func:`tiny_llava_next` model."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    cfg = reference.config
    s = cfg.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=cfg.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
