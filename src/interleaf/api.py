"""The public entry points: :func:`build`, :func:`load`, :func:`save`.

``build`` assembles a model and its processor from a preset name or from local pieces (the
equivalent of OpenFlamingo's ``create_model_and_transforms``); ``load`` reads a ``save_pretrained``
directory back. Nothing here touches the network: every path must be local.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from .cards import write_model_card
from .config import InterleafConfig, TokensConfig, VisionConfig, image_embeddings_per_image
from .errors import CheckpointError, ConfigError
from .files import local_dir
from .model import InterleafForConditionalGeneration, lora
from .presets import get_preset
from .processing import ImageTransform, InterleafProcessor, build_tiny_tokenizer
from .processing.tokenizer import load_tokenizer

PathLike = str | Path


def _resolve_tokenizer(tokenizer: Any, lm: Any):
    if tokenizer is None and isinstance(lm, (str, Path)):
        tokenizer = lm
    if tokenizer is None or tokenizer == "tiny":
        return build_tiny_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    return tokenizer


def _add_special_tokens(tokenizer, tokens: TokensConfig, lm_vocab: int | None) -> TokensConfig:
    """Add the prompt format's special tokens; decide which ids get decoupled trainable rows."""
    before = len(tokenizer)
    missing = [t for t in tokens.required_tokens() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    after = len(tokenizer)
    vocab = lm_vocab if lm_vocab is not None else before
    if before > vocab:
        extra_start = vocab  # the tokenizer already holds tokens beyond the LM's rows (IDEFICS)
    else:
        extra_start = before
    num_extra = max(0, after - extra_start)
    image_id = tokenizer.convert_tokens_to_ids(tokens.image_token)
    return dataclasses.replace(
        tokens, extra_start=extra_start if num_extra else None, num_extra=num_extra, image_token_id=image_id
    )


def build(
    preset: str | None = None,
    *,
    vision: PathLike | VisionConfig | dict | None = None,
    lm: PathLike | PreTrainedModel | PreTrainedConfig | dict | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    **options: Any,
) -> tuple[InterleafForConditionalGeneration, InterleafProcessor]:
    """Assemble ``(model, processor)`` from a preset or from local pieces.

    ``interleaf.build("tiny-random")``, or ``interleaf.build(vision="path/to/clip", lm="path/to/llm",
    tokenizer=None, cross_attention={"every_n_layers": 2}, resampler={...}, tokens={...},
    freeze="flamingo")``. ``vision`` and ``lm`` may be local ``save_pretrained`` directories (their
    weights are loaded) or configs (random weights). ``device="meta"`` builds without memory.

    The token-insertion family: ``interleaf.build("tiny-llava")``, or ``fusion="token_insertion"``
    with ``projector={"kind": "mlp2x_gelu"}`` and ``insertion={"placement": "expand"}``; the
    prompt format defaults to ``llava`` and ``tokens.image_seq_length`` to the tower's tokens.

    A preset's chat template and stop token (``Preset.chat_template``, ``stop_token``, ``generation``)
    go onto the tokenizer (its ``chat_template`` and eos token) and the model's ``generation_config``
    (``eos_token_id``, ``pad_token_id``), which :func:`save` writes.
    """
    sections: dict[str, Any] = {}
    if preset is not None:
        sections, lm, tokenizer = _preset_sections(preset, lm, tokenizer)
    _merge_options(sections, options)
    if lm is None:
        raise ConfigError("lm", "is required without a preset: a local LM directory or a transformers config")
    if seed is not None:
        torch.manual_seed(seed)

    # "none": the preset's vocabulary comes from its config and its tokens section (special-token
    # ids where the released checkpoints put them); there is no processor without a tokenizer.
    tok = None if tokenizer == "none" else _resolve_tokenizer(tokenizer, lm)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        lm_model = _build_lm(lm, tok, dtype)
        vision_module = _vision_section(vision, sections)
        tokens = TokensConfig(**_insertion_tokens(sections))
        if tok is not None:
            tokens = _add_special_tokens(tok, tokens, lm_model.get_input_embeddings().weight.shape[0])
        config = InterleafConfig(text_config=lm_model.config, tokens=dataclasses.asdict(tokens), **sections)
        model = InterleafForConditionalGeneration(config, language_model=lm_model, vision_model=vision_module)
        if dtype is not None:
            model.to(dtype)
    model.apply_freeze()
    if preset is not None:
        apply_prompting(model, tok, get_preset(preset))
    if tok is None:
        return model.eval(), None
    return model.eval(), processor_for(model.config, tok)


def processor_for(config: InterleafConfig, tokenizer) -> InterleafProcessor:
    """The processor of a model of ``config`` over ``tokenizer``: its image transform, context length,
    and for the token-insertion family its any-resolution tiling (xGen-MM's positions per view travel in
    ``tokens.image_lm_length``)."""
    anyres = config.insertion_cfg.anyres if config.fusion == "token_insertion" else None
    return InterleafProcessor(
        tokenizer,
        config.tokens_cfg,
        ImageTransform.from_vision_config(config.vision_cfg),
        max_length=getattr(config.text_config, "max_position_embeddings", None),
        anyres=anyres,
    )


def apply_prompting(model, tokenizer, preset) -> None:
    """Put ``preset``'s (a :class:`~interleaf.presets.Preset` or its name) chat template and stop token on ``tokenizer`` (when given) and its generation ids on
    ``model.generation_config``: with a tokenizer the ids are the tokenizer's (the stop token as eos, when it
    has that token; its pad token), without one the preset's ``generation`` ids as they are."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset.chat_template is None and preset.stop_token is None and not preset.generation:
        return  # a preset without prompting settings leaves the tokenizer and generation config as they are
    gen = model.generation_config
    if tokenizer is None:
        for key, value in preset.generation.items():
            setattr(gen, key, value)
        return
    if preset.chat_template is not None:
        tokenizer.chat_template = preset.chat_template
    if preset.stop_token is not None and preset.stop_token in tokenizer.get_vocab():
        tokenizer.eos_token = preset.stop_token
        gen.eos_token_id = tokenizer.convert_tokens_to_ids(preset.stop_token)
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def _preset_sections(preset: str, lm: Any, tokenizer: Any) -> tuple[dict[str, Any], Any, Any]:
    """The preset's config sections, and ``lm`` / ``tokenizer`` defaulted from it."""
    p = get_preset(preset)
    if p.unavailable:
        raise ConfigError(p.unavailable_part, f"preset {p.name!r} cannot be built: {p.unavailable}")
    sections = dict(
        vision=dict(p.vision), resampler=dict(p.resampler), cross_attention=dict(p.cross_attention),
        tokens=dict(p.tokens), freeze=p.freeze,
    )
    if p.fusion != "cross_attention":
        sections.update(fusion=p.fusion, projector=dict(p.projector), insertion=dict(p.insertion))
    if lm is None:
        lm = dict(p.text_config)
    if tokenizer is None and p.tokenizer in ("tiny", "none"):
        tokenizer = p.tokenizer
    return sections, lm, tokenizer


def _merge_options(sections: dict[str, Any], options: dict[str, Any]) -> None:
    """Fold ``build``'s keyword sections into ``sections`` (dicts update the preset's); unknown ones are errors."""
    for key in ("resampler", "cross_attention", "tokens", "projector", "insertion"):
        if key in options:
            sections[key] = {**sections.get(key, {}), **dict(options.pop(key))}
    for key in ("freeze", "z_loss", "fusion"):
        if key in options:
            sections[key] = options.pop(key)
    if options:
        raise ConfigError(
            next(iter(options)), "unknown option of interleaf.build",
            "known: vision, lm, tokenizer, fusion, resampler, cross_attention, projector, insertion, tokens, "
            "freeze, z_loss, device, dtype, seed",
        )


def _insertion_tokens(sections: dict[str, Any]) -> dict[str, Any]:
    """The tokens section; for token insertion with ``expand``, the ``llava`` format and one
    ``<image>`` per vision token unless the caller says otherwise."""
    tokens = dict(sections.pop("tokens", {}))
    if sections.get("fusion") != "token_insertion":
        return tokens
    placement = sections.get("insertion", {}).get("placement", "expand")
    tokens.setdefault("prompt_format", "llava")
    if placement == "expand" and "image_seq_length" not in tokens:
        tokens["image_seq_length"] = image_embeddings_per_image(sections.get("projector", {}), sections.get("vision", {}))
    return tokens


def _build_lm(lm: Any, tok: Any, dtype: torch.dtype | None) -> PreTrainedModel:
    """The language model: loaded from a local directory, given, or built from a config (random weights)."""
    if isinstance(lm, (str, Path)):
        lm_dir = local_dir(lm, "language model", ("config.json",))
        return AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True, dtype=dtype)
    if isinstance(lm, PreTrainedModel):
        return lm
    text_cfg = dict(lm.to_dict() if isinstance(lm, PreTrainedConfig) else lm)
    if text_cfg.get("vocab_size") is None:
        if tok is None:
            raise ConfigError("text_config.vocab_size", "is required when no tokenizer is given")
        text_cfg["vocab_size"] = len(tok)
    text_cfg = InterleafConfig(text_config=text_cfg).text_config
    return AutoModelForCausalLM.from_config(text_cfg, dtype=dtype)


def _vision_section(vision: Any, sections: dict[str, Any]):
    """Set ``sections["vision"]`` from ``vision``; the loaded tower when ``vision`` is a directory, else None."""
    if isinstance(vision, (str, Path)):
        from .model.vision import load_vision_tower

        vcfg, vision_module = load_vision_tower(vision)
        kept = ("feature_layer", "drop_cls_token", "post_layernorm")  # the preset's choices stay
        sections["vision"] = {**dataclasses.asdict(vcfg),
                              **{k: v for k, v in sections.get("vision", {}).items() if k in kept}}
        return vision_module
    if isinstance(vision, VisionConfig):
        sections["vision"] = dataclasses.asdict(vision)
    elif isinstance(vision, dict):
        sections["vision"] = {**sections.get("vision", {}), **vision}
    return None


def load(
    path: PathLike, *, device_map: Any = None, dtype: torch.dtype | str | None = None, **kwargs: Any
) -> tuple[InterleafForConditionalGeneration, InterleafProcessor]:
    """Load ``(model, processor)`` from a directory written by :func:`save` (offline).

    A directory with LoRA adapters (``adapter_config.json``, see :mod:`interleaf.model.lora`) gives
    the model with its adapters attached and unmerged: still an ``InterleafForConditionalGeneration``
    (``model.active_adapters()``), whose outputs include the adapters; ``interleaf.merge_lora(model)``
    folds them in. An adapter-only directory loads the base model its ``adapter_config.json`` names.
    """
    if lora.is_adapter_dir(path):
        lora.check_adapter_dir(path)
        base = lora.adapter_base(path)
        if base != Path(path):
            model, processor = load(base, device_map=device_map, dtype=dtype, **kwargs)
            lora.attach_saved(model, path)
            return model.eval(), processor
    p = local_dir(path, "model", ("config.json",))
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(f"model directory {str(p)!r} has no *.safetensors weights; was it saved with interleaf.save?")
    try:
        model = InterleafForConditionalGeneration.from_pretrained(
            str(p), local_files_only=True, device_map=device_map, dtype=dtype, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the model in {str(p)!r}: {e}") from e
    if lora.is_adapter_dir(p):  # transformers attaches a directory's adapters while loading; check that it did
        lora.attach_saved(model, p)
    model.apply_freeze()  # the config's freeze policy, as build applies it
    processor = InterleafProcessor.from_pretrained(p)
    return model.eval(), processor


def save(
    model: InterleafForConditionalGeneration, processor: InterleafProcessor, path: PathLike, *, card: dict | None = None
) -> Path:
    """Write a directory that :func:`load` and transformers' ``Auto*`` classes read back (a model with
    LoRA adapters: the base model and the adapters, :func:`interleaf.model.lora.save_adapted`).

    It gets a model card (``README.md``, see :mod:`interleaf.cards`; a README the user wrote is
    kept); ``card`` holds :func:`interleaf.cards.write_model_card`'s keywords (``base_model``,
    ``datasets``, ``training``, ``evaluation``, ``tags``).
    """
    # a model loaded from a directory passes on that directory's card (base models, training stages)
    carried = {"carry_from": getattr(model.config, "name_or_path", None) or None}
    if lora.has_adapters(model):
        p = lora.save_adapted(model, processor, path)
        write_model_card(p, **{**carried, **(card or {})})
        return p
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(p)
    processor.save_pretrained(p)
    write_model_card(p, **{**carried, **(card or {})})
    return p
