"""The assembled model: vision tower -> resampler -> gated cross-attention inside any causal LM,
or, for ``fusion: token_insertion``, vision tower -> projector -> embeddings in the LM's input
(:mod:`interleaf.model.token_insertion`). One class serves both families, so training,
evaluation and serving call ``forward`` / ``generate`` without knowing which one they hold.

::

    pixel_values (B, N_img, 3, H, W)
        ──► VisionTower ──► (B, N_img, V, Dv) ──► PerceiverResampler ──► latents (B, N_img, L, Dv)
        ──► MediaCache: per block K/V (B, H, N_img * L, Dh), projected once per call
    input_ids (B, T) ──► LM (decoder layers, some preceded by gated cross-attention) ──► logits

Images are found in the text by the image token: token t attends image j where j + 1 is the
number of image tokens at or before t. Tokens before the first image see none. Tokens after the
prompt (generation, scoring with a cached context) attend the prompt's last image.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from ..config import InterleafConfig
from ..errors import InputError
from .cross_attention import (
    CrossAttentionDecoderLayer,
    GatedCrossAttentionBlock,
    MediaCache,
    MediaContext,
    media_context,
)
from . import inserted_images, token_insertion
from .compiled import cached_prefix, compile_options
from .backbone import Backbone
from .embeddings import DecoupledEmbedding, DecoupledHead, FullVocabularyHead
from .inserted_images import InsertedImages
from .lm import attach_cross_attention, decouple_new_tokens
from .loss import causal_lm_loss
from .projectors import build_projector
from .resampler import PerceiverResampler
from .vision import VisionTower, build_vision_tower

logger = logging.getLogger(__name__)


@dataclass
class InterleafOutput(ModelOutput):
    """Output of :meth:`InterleafForConditionalGeneration.forward`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    media_cache: MediaCache | None = None
    z_loss: torch.Tensor | None = None


class InterleafPreTrainedModel(PreTrainedModel):
    config_class = InterleafConfig
    base_model_prefix = "interleaf"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["CrossAttentionDecoderLayer", "VisionTower", "PerceiverResampler"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # interleaf's own modules initialise themselves at construction; the LM and HF vision towers
        # are PreTrainedModels and get their own _init_weights dispatched by transformers. Loading
        # with from_pretrained fills every parameter from the checkpoint.
        return


class InterleafForConditionalGeneration(InterleafPreTrainedModel, GenerationMixin):
    """A vision-language model around any transformers causal LM, in one of two families.

    ``config.fusion == "cross_attention"`` (Flamingo, OpenFlamingo, IDEFICS): resampler and gated
    cross-attention blocks. ``"token_insertion"`` (LLaVA, xGen-MM): a ``projector`` whose output is
    written into the LM's input (:mod:`~interleaf.model.token_insertion`). One class for both, so
    that training, evaluation and serving call ``forward`` / ``generate`` without asking which.
    """

    def __init__(
        self,
        config: InterleafConfig,
        language_model: PreTrainedModel | None = None,
        vision_model: nn.Module | None = None,
    ):
        super().__init__(config)
        if config.text_config is None:
            raise InputError("InterleafConfig.text_config is empty: the model needs an LM config")
        vcfg = config.vision_cfg
        self.vision_tower: VisionTower = (
            vision_model if isinstance(vision_model, VisionTower) else build_vision_tower(vcfg, vision_model)
        )
        media_dim = self.vision_tower.out_dim
        inserts = config.fusion == "token_insertion"
        rcfg = config.resampler_cfg
        self.resampler = PerceiverResampler(rcfg, media_dim) if rcfg.enabled and not inserts else None
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.get_text_config_object())
        self.language_model = language_model
        config.text_config = language_model.config  # one LM config object, with its attention implementation
        if language_model.config._attn_implementation is None:
            language_model.set_attn_implementation("sdpa")
        if inserts:
            self.projector: nn.Module = build_projector(config.projector_cfg, media_dim, language_model.config.hidden_size)
            token_insertion.check_config(self)
        else:
            attach_cross_attention(self.language_model, config.xattn_cfg, media_dim)
        tcfg = config.tokens_cfg
        if tcfg.extra_start is not None and tcfg.num_extra:
            decouple_new_tokens(self.language_model, tcfg.extra_start, tcfg.num_extra, tcfg.decoupled_head == "xgenmm")
        if isinstance(self.language_model.get_output_embeddings(), DecoupledHead):
            # registered (PEFT finds the output layer among the named modules) but owning no parameter
            self.full_vocabulary_head = FullVocabularyHead(self.language_model)
        self._lm_accepts_position_ids = "position_ids" in inspect.signature(self.language_model.forward).parameters
        self.post_init()

    # ------------------------------------------------------------------ structure
    @property
    def cross_attention_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [m.cross_attention for m in self.modules() if isinstance(m, CrossAttentionDecoderLayer)]

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        """The output layer over the whole vocabulary: the LM's head, or, when the added tokens have rows of
        their own (:class:`DecoupledHead`), a :class:`FullVocabularyHead` over it whose ``weight`` and ``bias``
        include the added rows. The LM's own module is ``language_model.get_output_embeddings()``."""
        head = self.language_model.get_output_embeddings()
        if isinstance(head, DecoupledHead) and "full_vocabulary_head" in self._modules:
            return self.full_vocabulary_head
        return head

    @property
    def base_model(self) -> nn.Module:
        """The model without its output head (:class:`~interleaf.model.backbone.Backbone`): ``forward``'s
        inputs in, ``last_hidden_state`` out, images fused as in ``forward``."""
        return Backbone(self)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def image_token_id(self) -> int:
        tid = self.config.tokens_cfg.image_token_id
        if tid is None:
            raise InputError(
                "this model has no image token id in its config (tokens.image_token_id); "
                "build it with interleaf.build(...) so the tokenizer and the model agree"
            )
        return tid

    # ------------------------------------------------------------------ freezing
    def apply_freeze(self, policy: str | None = None) -> int:
        """Set ``requires_grad`` by policy; returns the number of trainable parameters.

        - ``flamingo``: vision tower and LM frozen; resampler, cross-attention and the added token
          rows train (Flamingo, OpenFlamingo, IDEFICS pretraining).
        - ``flamingo_train_vision``: as ``flamingo`` plus the vision tower, for a tower trained
          from scratch (the demo) rather than a pretrained CLIP.
        - ``unfreeze_lm``: as ``flamingo`` plus the whole LM (InfiMM's instruction stage).
        - ``projector`` (token insertion): the projector and the added token rows (LLaVA's
          pre-training stage), except the input rows that are never read
          (:func:`freeze_overwritten_token_rows`: ``<image>``'s positions get the image's embeddings).
        - ``projector_lm`` (token insertion): as ``projector`` plus the whole LM (LLaVA's
          instruction tuning).
        - ``all_trainable``: everything, vision tower included (training then freezes what is
          never used: :func:`freeze_unused_vision_parameters`, :func:`freeze_overwritten_token_rows`).
        """
        policy = policy or self.config.freeze
        from ..config import FREEZE_POLICIES, freeze_policies

        if policy not in FREEZE_POLICIES:
            raise InputError(f"unknown freeze policy {policy!r}; choose one of {list(FREEZE_POLICIES)}")
        if policy not in freeze_policies(self.config.fusion):
            raise InputError(
                f"freeze policy {policy!r} does not apply to a {self.config.fusion!r} model; "
                f"choose one of {list(freeze_policies(self.config.fusion))}"
            )
        for p in self.parameters():
            p.requires_grad_(policy == "all_trainable")
        for module in self.modules():
            if isinstance(module, DecoupledEmbedding):
                module.freeze_rows(())
        if policy in ("projector", "projector_lm"):
            self.projector.requires_grad_(True)
            if policy == "projector_lm":
                self.language_model.requires_grad_(True)
        if policy != "all_trainable":
            if policy == "unfreeze_lm":
                self.language_model.requires_grad_(True)
            if policy == "flamingo_train_vision":
                self.vision_tower.requires_grad_(True)
                freeze_unused_vision_parameters(self)
            if self.resampler is not None:
                self.resampler.requires_grad_(True)
            for block in self.cross_attention_blocks:
                block.requires_grad_(True)
            for module in self.modules():
                if isinstance(module, (DecoupledEmbedding, DecoupledHead)):
                    module.extra.requires_grad_(True)
                    if getattr(module, "extra_bias", None) is not None:
                        module.extra_bias.requires_grad_(True)
            if policy in ("projector", "projector_lm"):
                freeze_overwritten_token_rows(self)
        n = self.num_trainable_parameters()
        logger.info("freeze policy %s: %s trainable of %s parameters", policy, f"{n:,}", f"{self.num_parameters():,}")
        return n

    def num_trainable_parameters(self) -> int:
        """Elements that train: those of parameters requiring a gradient, less added rows frozen one by one."""
        seen, n = set(), 0
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n - sum(m.num_frozen_elements() for m in self.modules() if isinstance(m, DecoupledEmbedding))

    # ------------------------------------------------------------------ images
    def encode_images(self, pixel_values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Image latents ``(B, N_img, L, Dv)``; only images marked ``valid`` (B, N_img) are computed."""
        pixel_values = _as_5d(pixel_values)
        b, n = pixel_values.shape[:2]
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=pixel_values.device)
        dtype = next(self.vision_tower.parameters()).dtype
        real = pixel_values[valid].to(dtype)  # (K, 3, H, W)
        feats = self.vision_tower(real[None])[0] if real.shape[0] else None  # (K, V, Dv)
        if feats is not None and self.resampler is not None:
            feats = self.resampler(feats[None])[0]  # (K, L, Dv)
        if feats is None:
            length = self.config.resampler_cfg.num_latents if self.resampler is not None else self.vision_tower.num_tokens
            feats = torch.zeros(0, length, self.vision_tower.out_dim, dtype=dtype, device=pixel_values.device)
        latents = feats.new_zeros(b, n, *feats.shape[1:])  # (B, N_img, L, Dv)
        latents[valid] = feats
        return latents

    def prepare_media(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
        image_sizes=None,
    ) -> MediaCache | InsertedImages:
        """Encode a batch's images once, for ``generate(..., media_cache=...)`` over one or more calls.

        Either family: the result has ``.select(rows)`` (keep some rows, as the KV cache's
        ``batch_select_indices``). Cross-attention: a :class:`MediaCache` (each block projects its
        keys and values at its first call). Token insertion: :class:`InsertedImages` (the image
        embeddings, and the grown prompt with ``replace`` placement, which needs ``attention_mask``
        for a left-padded batch; ``image_sizes`` as ``forward`` takes them, for any-resolution models).
        """
        if self.config.fusion == "token_insertion":
            return inserted_images.prepare(self, input_ids, pixel_values, attention_mask, image_sizes)
        if image_sizes is not None:
            raise InputError("image_sizes is for any-resolution token-insertion models; drop it")
        pixel_values = _as_5d(pixel_values)
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise InputError(
                f"pixel_values has {pixel_values.shape[0]} rows but input_ids has {input_ids.shape[0]}: "
                "process images and text together with the interleaf processor"
            )
        num_images = (input_ids == self.image_token_id).sum(-1)  # (B,)
        n = pixel_values.shape[1]
        too_many = (num_images > n).nonzero().flatten().tolist()
        if too_many:
            r = too_many[0]
            raise InputError(
                f"batch row {r} has {int(num_images[r])} image tokens but pixel_values holds {n} images per row: "
                "every image token needs an image (use the interleaf processor, which adds both)"
            )
        valid = torch.arange(n, device=input_ids.device)[None, :] < num_images[:, None]  # (B, N_img)
        latents = self.encode_images(pixel_values, valid.to(pixel_values.device))
        return MediaCache(latents=latents, num_images=num_images)

    def _media_context(
        self,
        input_ids: torch.Tensor,
        cache: MediaCache,
        past_length: int | bool | torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
    ) -> MediaContext:
        """Which image each token attends, on the device. ``past_length``: the cached length, or whether there
        is a cached prefix (:func:`cached_prefix`: a tensor for a static cache's prompt); tokens after one
        attend the prompt's last image. One token per row, or a cached prefix: ``one_image_per_row``."""
        rows = input_ids.shape[0]
        row_index = cache.row_index(rows)
        num_images = cache.num_images if row_index is None else cache.num_images[row_index]  # (B_run,)
        num_images = num_images.to(input_ids.device)
        last = (num_images - 1)[:, None]  # (B_run, 1)
        after_prompt = not torch.is_tensor(past_length) and past_length > 0
        if after_prompt:  # tokens after the prompt attend its last image
            index = last.expand_as(input_ids)
        else:
            index = (input_ids == self.image_token_id).long().cumsum(-1) - 1  # (B, T)
            if image_attention_mask is not None and image_attention_mask.shape[:2] == input_ids.shape:
                # An explicit mask may take images away (IDEFICS' packed input: none after an EOS).
                sees = image_attention_mask.to(input_ids.device).bool().any(-1)  # (B, T)
                index = index.masked_fill(~sees, -1)
            if torch.is_tensor(past_length):  # a static cache: prompt or continuation, told apart on the device
                index = torch.where(past_length.to(index.device) > 0, last.expand_as(index), index)
        index = torch.minimum(index, last)
        seen = index >= 0  # (B, T)
        sees = seen[..., None].float()  # (B, T, 1)
        # a row in a batch where no token sees an image computes the plain LM (as without cross-attention)
        row_has_image = ((num_images > 0)[:, None, None] & seen.any()).float()  # (B, 1, 1)
        return MediaContext(cache=cache, image_index=index, row_index=row_index, sees_image=sees,
                            row_has_image=row_has_image, one_image_per_row=after_prompt or input_ids.shape[1] == 1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        media_cache: MediaCache | None = None,
        past_key_values=None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_attention_mask: torch.Tensor | None = None,  # IDEFICS-style; may only take images away
        batch_images: torch.Tensor | None = None,  # InfiMM's name for pixel_values, (B, N_img, 1, 3, H, W)
        return_dict: bool | None = None,
        image_embeds: torch.Tensor | None = None,  # token insertion: images already encoded (generate)
        hidden_states_only: bool = False,  # base_model's call: the LM's final hidden states, no head
        decoding: bool = False,  # generate's decoding step: the input continues the cached prompt
        **kwargs,
    ) -> InterleafOutput | BaseModelOutputWithPast:
        if self.config.fusion == "token_insertion":
            if input_ids is None:
                raise InputError("input_ids is required (interleaf finds images in the text by the image token)")
            if media_cache is not None:
                raise InputError(
                    "a token-insertion model's forward takes pixel_values (or image_embeds); media_cache from "
                    "prepare_media is for generate"
                )
            return token_insertion.forward(
                self, input_ids, attention_mask, pixel_values, image_embeds, past_key_values, position_ids,
                labels, use_cache, logits_to_keep, hidden_states_only=hidden_states_only, decoding=decoding, **kwargs,
            )
        if image_embeds is not None:
            raise InputError("image_embeds is for token-insertion models; pass pixel_values")
        if batch_images is not None:
            if pixel_values is not None:
                raise InputError("pass either pixel_values or batch_images, not both")
            pixel_values = batch_images
        if input_ids is None:
            raise InputError("input_ids is required (interleaf finds images in the text by the image token)")
        cached = cached_prefix(past_key_values, decoding)  # on the host, or a static cache's prompt: a tensor
        if pixel_values is not None:
            if media_cache is not None:
                raise InputError("pass either pixel_values or media_cache, not both")
            if bool(cached):
                raise InputError(
                    "new images cannot be added after a cached prefix; run the whole prompt with its images"
                )
            media_cache = self.prepare_media(input_ids, pixel_values)
        # no image slots: no cross-attention; else tokens that see no image get the plain LM's values exactly
        ctx = (
            self._media_context(input_ids, media_cache, cached, image_attention_mask)
            if media_cache is not None and media_cache.latents.shape[1] > 0
            else None
        )
        if position_ids is None and attention_mask is not None and self._lm_accepts_position_ids:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1] :]
        lm_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
        )
        if self._lm_accepts_position_ids and position_ids is not None:
            lm_kwargs["position_ids"] = position_ids
        if hidden_states_only:
            lm_kwargs.pop("logits_to_keep")
            with media_context(ctx):
                out = self.language_model.base_model(**lm_kwargs, **kwargs)
            return BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, past_key_values=out.past_key_values)
        with media_context(ctx):
            out = self.language_model(**lm_kwargs, **kwargs)
        loss = z = None
        if labels is not None:
            loss, z = causal_lm_loss(out.logits, labels, self.config.z_loss)
        return InterleafOutput(
            loss=loss, logits=out.logits, past_key_values=out.past_key_values, media_cache=media_cache, z_loss=z
        )

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """transformers' inputs, marking decoding steps over a static cache (``decoding``): such a cache
        keeps its length on the device, and a step must not read it on the host."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length, past_key_values, attention_mask, inputs_embeds, is_first_iteration, **kwargs
        )
        cache = inputs.get("past_key_values")
        if not is_first_iteration and getattr(cache, "is_compileable", False):
            inputs["decoding"] = True
        return inputs

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, media_cache=None, compile=False, **kwargs):
        """transformers' ``generate`` with images encoded and keys/values projected once per call.

        ``compile=True``: a compiled decoding step (:mod:`~interleaf.model.compiled`). Also accepts the
        seeds' spellings: ``batch_images`` for ``pixel_values``;
        ``min_generation_length`` / ``max_generation_length`` for ``min_new_tokens`` /
        ``max_new_tokens``; ``image_attention_mask`` (derived from the text, so ignored).
        """
        if "batch_images" in kwargs:
            pixel_values = kwargs.pop("batch_images")
        if "min_generation_length" in kwargs:
            kwargs["min_new_tokens"] = kwargs.pop("min_generation_length")
        if "max_generation_length" in kwargs:
            kwargs["max_new_tokens"] = kwargs.pop("max_generation_length")
        kwargs.pop("image_attention_mask", None)
        if input_ids is None:
            raise InputError("generate needs input_ids: run the prompt through the interleaf processor first")
        if compile:
            kwargs = compile_options(self.device, kwargs, input_ids.shape[1])
        if self.config.fusion == "token_insertion":
            embeds = kwargs.pop("image_embeds", None)
            if media_cache is not None:
                if pixel_values is not None or embeds is not None:
                    raise InputError("pass either pixel_values, image_embeds or media_cache, not more than one")
                return inserted_images.generate(self, super().generate, input_ids, attention_mask, media_cache, kwargs)
            return token_insertion.generate(
                self, super().generate, input_ids, attention_mask, pixel_values, embeds, kwargs
            )
        if pixel_values is not None:
            if media_cache is not None:
                raise InputError("pass either pixel_values or media_cache, not both")
            media_cache = self.prepare_media(input_ids, pixel_values)
        if media_cache is not None:
            kwargs["media_cache"] = media_cache
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _as_5d(pixel_values: torch.Tensor) -> torch.Tensor:
    """Accept (B, 3, H, W), (B, N, 3, H, W) and InfiMM's (B, N, 1, 3, H, W)."""
    if not torch.is_tensor(pixel_values):
        raise InputError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() == 4:
        return pixel_values[:, None]
    if pixel_values.dim() == 6 and pixel_values.shape[2] == 1:
        return pixel_values[:, :, 0]
    if pixel_values.dim() != 5:
        raise InputError(
            f"pixel_values must be (batch, images, 3, height, width), got shape {tuple(pixel_values.shape)}"
        )
    return pixel_values


def freeze_unused_vision_parameters(model: nn.Module) -> None:
    """Freeze the vision tower's layers past its feature layer: they never get a gradient.

    DDP would wait for their gradients otherwise; towers without such layers are left as they are.
    """
    backbone = getattr(model.vision_tower, "backbone", None)
    for p in getattr(backbone, "unused_parameters", list)():
        p.requires_grad_(False)


def overwritten_token_rows(model: nn.Module) -> tuple[int, ...]:
    """Rows of the added input embeddings (0-based within ``extra``) that the model never reads.

    Token insertion writes the image's embeddings over every ``<image>`` position (and, in
    xGen-MM's base format, over its ``<image placeholder>`` positions), so those tokens' input rows
    never reach the LM. Empty for the cross-attention family, where ``<image>`` is read as text.
    """
    cfg = model.config
    tokens = cfg.tokens_cfg
    if cfg.fusion != "token_insertion" or tokens.extra_start is None or not tokens.num_extra:
        return ()
    ids = {tokens.image_token_id, tokens.image_placeholder_token_id} - {None}
    return tuple(sorted(i - tokens.extra_start for i in ids if 0 <= i - tokens.extra_start < tokens.num_extra))


def freeze_overwritten_token_rows(model: nn.Module) -> None:
    """Freeze the added input rows the model never reads (:func:`overwritten_token_rows`); an
    embedding whose added rows are all such rows stops being trainable. The output rows stay as
    they are: every added token's logit is computed, so its row gets a gradient."""
    rows = overwritten_token_rows(model)
    if not rows:
        return
    for module in model.modules():
        if isinstance(module, DecoupledEmbedding):
            module.freeze_rows(rows)
