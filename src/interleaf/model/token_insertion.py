"""Token insertion (LLaVA, xGen-MM): image embeddings written into the LM's input sequence.

::

    pixel_values ──► VisionTower ──► (K, V, Dv) ──► projector ──► (K, V', D)   (K: the batch's images, once per call)
    input_ids (B, T) ──► embeddings (B, T, D), image positions overwritten in order ──► LM ──► logits

Placement (``insertion.placement``):

- ``expand`` (LLaVA): the processor wrote one ``<image>`` token per vision token, so the text
  already has the image's length; the embeddings go over those tokens, row by row, image by image.
- ``replace`` (xGen-MM): the text holds one ``<image>`` token per image. :func:`expand_image_tokens`
  first replaces each by as many ``<image>`` tokens as the image has embeddings (attention mask 1,
  label -100), re-padding the batch; then the ``expand`` rule applies. The loss is taken over the
  grown sequence with the labels grown alongside (-100 on every vision position). The returned
  ``logits`` are mapped back to the caller's positions (:func:`text_positions`), so that for
  every model ``logits[:, t]`` predicts token ``t + 1`` of ``input_ids``: a text position keeps its
  own logit, an ``<image>`` position the logit of that image's LAST inserted vision token (the one
  that predicts the text after the image; xGen-MM's ``_postprocess_outputs_from_forward`` keeps
  the first, which predicts a vision token). The trainer's loss on these logits with the caller's
  labels is the grown-sequence loss exactly. ``past_key_values`` holds the grown sequence: a call
  that continues it passes an attention mask as long as the cache (``past_key_values.get_seq_length()``).

xGen-MM's own cases (images of any resolution, whose lengths follow from ``image_sizes``; the base
format's ``<image>`` + placeholders) are in :mod:`interleaf.model.xgenmm`, called from here.

Images per row: a row with ``n`` images has ``n * V'`` image tokens (expand) or ``n`` (replace);
rows may have 0..k images. ``pixel_values`` comes as LLaVA gives it, ``(K, 3, H, W)`` with the
batch's images in reading order, or as the interleaf processor gives it, ``(B, N, 3, H, W)`` with
each row's images first and zero padding after. Image token labels are never trained.

LLaVA-NeXT (``insertion.anyres`` with convention ``llava_next``): each image comes as its views
(base first, then the crops of its grid) with its original size; ``pixel_values`` is
``(K, max_views, 3, S, S)`` (zero-padded on the view axis) or ``(sum of views, 3, S, S)``, and
``image_sizes`` is ``(K, 2)`` as ``(height, width)``, both as transformers' ``LlavaNextProcessor``
returns them (and the interleaf processor too). All views of the call go through the tower and
the projector at once; each image is then packed (:func:`interleaf.processing.anyres.llava_next_pack`:
base tokens, then the unpadded crop map row by row, each row closed by the learned
``projector.image_newline``) and written over that image's ``<image>`` run, images in reading order.

Generation: the images are encoded once, before the first step (:func:`encode_rows`, the
``image_embeds`` argument); later steps feed only new text tokens and the LM's own KV cache holds
the rest. A token fed after a cached prefix is generated text: an ``<image>`` token the model
generated is embedded as an ordinary token, never overwritten by image features.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..processing.prompt_format import IGNORE_INDEX
from . import xgenmm
from .compiled import cached_prefix
from .llava_next import check_llava_next, llava_next_anyres, llava_next_rows
from .loss import causal_lm_loss

__all__ = [
    "check_config",
    "check_llava_next",
    "encode_rows",
    "expand_image_tokens",
    "flat_images",
    "forward",
    "images_per_row",
    "logits_at_text_positions",
    "prepare_images",
    "text_positions",
    "tokens_per_image",
    "write_image_embeddings",
]


def tokens_per_image(model) -> int:
    """V': embeddings one image becomes (a resampling projector's latents, else the vision tower's tokens)."""
    count = getattr(model.projector, "num_latents", None)
    return int(count) if count is not None else int(model.vision_tower.num_tokens)


def check_config(model) -> None:
    """At construction: with ``expand``, the processor's tokens per image must be what the model writes.

    A LLaVA-NeXT model (anyres, ``llava_next``) writes a count that depends on the image instead; its
    check is :func:`check_llava_next`, which also gives the projector its ``image_newline``.
    """
    cfg = model.config
    if llava_next_anyres(model) is not None:
        check_llava_next(model)
        return
    if cfg.insertion_cfg.placement == "expand" and cfg.tokens_cfg.image_seq_length != tokens_per_image(model):
        raise ConfigError(
            "tokens.image_seq_length",
            f"is {cfg.tokens_cfg.image_seq_length} but one image gives {tokens_per_image(model)} embeddings "
            "(the vision tower's tokens, or the projector's)",
            f"set tokens.image_seq_length: {tokens_per_image(model)}",
        )
    xgenmm.check_config(model)


def images_per_row(input_ids: torch.Tensor, image_token_id: int, per_image: int) -> list[int]:
    """How many images each row's image tokens stand for (``per_image`` tokens each, the ``expand``
    layout); an error names a row that does not add up."""
    counts = (input_ids == image_token_id).sum(-1).tolist()  # (B,)
    bad = [r for r, c in enumerate(counts) if c % per_image]
    if bad:
        r = bad[0]
        raise InputError(
            f"batch row {r} has {counts[r]} image tokens, not a multiple of {per_image} (the tokens one image "
            "takes): each image needs exactly that many <image> tokens; use the interleaf processor (or the "
            "model's LlavaProcessor), which writes them"
        )
    return [c // per_image for c in counts]


def flat_images(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The batch's images in reading order, ``(K, 3, H, W)``, checked against the images each row's text names."""
    if not torch.is_tensor(pixel_values):
        raise InputError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
    total = sum(counts)
    if pixel_values.dim() == 4:  # LLaVA's layout: every image of the batch, in order
        if pixel_values.shape[0] != total:
            raise InputError(
                f"pixel_values holds {pixel_values.shape[0]} images but the text of the batch names {total} "
                f"(images per row: {counts}): pass one image per image in the prompts, in order"
            )
        return pixel_values
    if pixel_values.dim() == 5:  # the interleaf processor's layout: (B, N, 3, H, W), zero-padded rows
        if pixel_values.shape[0] != len(counts):
            raise InputError(
                f"pixel_values has {pixel_values.shape[0]} rows but input_ids has {len(counts)}: "
                "process images and text together with the interleaf processor"
            )
        n = pixel_values.shape[1]
        for r, c in enumerate(counts):
            if c > n:
                raise InputError(
                    f"batch row {r} names {c} images in its text but pixel_values holds {n} per row: "
                    "every image in the text needs its pixels (the interleaf processor adds both)"
                )
        return torch.cat([pixel_values[r, :c] for r, c in enumerate(counts)]) if total else pixel_values[:0, 0]
    raise InputError(
        "pixel_values must be (images, 3, height, width) as LLaVA's processor gives it, or (batch, images, 3, "
        f"height, width) as interleaf's does; got shape {tuple(pixel_values.shape)}"
    )


def encode_rows(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Every image of the batch through the vision tower and the projector once -> ``(B, S, D)``.

    ``input_ids`` is in the ``expand`` layout (grown first with ``replace``). Row ``b`` holds its
    images' embeddings one after another (``n_b * V'`` of them), then zeros.
    """
    per_image = tokens_per_image(model)
    counts = images_per_row(input_ids, model.image_token_id, per_image)
    flat = flat_images(pixel_values, counts)  # (K, 3, H, W)
    emb = model.get_input_embeddings()
    width, dtype = model.config.text_config.hidden_size, emb.weight.dtype
    rows = torch.zeros(len(counts), max(counts, default=0) * per_image, width, dtype=dtype, device=input_ids.device)
    if flat.shape[0] == 0:
        return rows
    features = model.vision_tower(flat[None])[0]  # (K, V, Dv)
    projected = model.projector(features).to(device=input_ids.device, dtype=dtype)  # (K, V', D)
    start = 0
    for r, c in enumerate(counts):
        rows[r, : c * per_image] = projected[start : start + c].reshape(-1, width)
        start += c
    return rows


def _encode(model, input_ids: torch.Tensor, pixel_values, image_sizes) -> torch.Tensor:
    """``(B, S, D)`` image embeddings by row: LLaVA-NeXT's packing when the model tiles so, else :func:`encode_rows`."""
    if llava_next_anyres(model) is not None:
        return llava_next_rows(model, input_ids, pixel_values, image_sizes)
    if image_sizes is not None and model.config.insertion_cfg.anyres is None:
        raise InputError("image_sizes is for LLaVA-NeXT models (any-resolution tiling); this model takes one "
                         "view per image: drop image_sizes")
    return encode_rows(model, input_ids, pixel_values)


def write_image_embeddings(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """Each row's image positions get that row's embeddings, in order. ``(B, T, D)`` -> ``(B, T, D)``."""
    mask = input_ids == image_token_id  # (B, T)
    if not bool(mask.any()):
        return inputs_embeds
    counts = mask.sum(-1)  # (B,)
    if image_embeds is None:
        r = int(counts.nonzero()[0])
        raise InputError(
            f"batch row {r} has {int(counts[r])} image tokens but no images were given: pass pixel_values "
            "(the processor returns them with the text)"
        )
    if image_embeds.shape[0] != input_ids.shape[0] or image_embeds.shape[1] < int(counts.max()):
        raise InputError(
            f"image_embeds {tuple(image_embeds.shape)} does not cover the image tokens of input_ids "
            f"{tuple(input_ids.shape)}: compute them with the same input_ids"
        )
    valid = torch.arange(image_embeds.shape[1], device=counts.device)[None, :] < counts[:, None]  # (B, S)
    values = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)[valid.to(image_embeds.device)]
    return inputs_embeds.masked_scatter(mask[..., None].to(inputs_embeds.device), values)


def expand_image_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    lengths: list[list[int]],
    image_token_id: int,
    pad_token_id: int,
    padding_side: str = "left",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """xGen-MM's placement: each image token becomes ``lengths[b][k]`` image tokens (k-th image of row b).

    Returns ``(input_ids, attention_mask, labels)`` of the grown batch, padded again on
    ``padding_side``: the inserted positions attend (mask 1) and are never trained (label -100);
    padding has mask 0 and label -100. Position ids follow from the mask (``cumsum - 1``).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, mask = input_ids[b][keep].tolist(), [1] * int(keep.sum())
        lab = labels[b][keep.to(labels.device)].tolist() if labels is not None else [IGNORE_INDEX] * len(ids)
        positions = [p for p, t in enumerate(ids) if t == image_token_id]
        if len(positions) != len(lengths[b]):
            raise InputError(
                f"batch row {b} has {len(positions)} image tokens but {len(lengths[b])} images: "
                "every <image> token needs exactly one image"
            )
        for p, n in reversed(list(zip(positions, lengths[b]))):
            ids[p : p + 1] = [image_token_id] * n
            mask[p : p + 1] = [1] * n
            lab[p : p + 1] = [IGNORE_INDEX] * n
        rows.append((ids, mask, lab))
    longest = max(len(ids) for ids, _, _ in rows)
    new_ids = torch.full((len(rows), longest), pad_token_id, dtype=input_ids.dtype)
    new_mask = torch.zeros((len(rows), longest), dtype=attention_mask.dtype)
    new_labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask, lab) in enumerate(rows):
        sl = slice(longest - len(ids), longest) if padding_side == "left" else slice(0, len(ids))
        new_ids[b, sl], new_mask[b, sl], new_labels[b, sl] = torch.tensor(ids), torch.tensor(mask), torch.tensor(lab)
    device = input_ids.device
    return new_ids.to(device), new_mask.to(device), (new_labels.to(labels.device) if labels is not None else None)


def replace_placement(model, input_ids, attention_mask, labels):
    """Grow a batch written with one ``<image>`` per image to the ``expand`` layout (see module docstring)."""
    per_image = tokens_per_image(model)
    counts = (input_ids == model.image_token_id).sum(-1).tolist()
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else 0  # any id: padding is masked out
    lengths = [[per_image] * c for c in counts]
    return expand_image_tokens(input_ids, attention_mask, labels, lengths, model.image_token_id, pad)


def text_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    grown_ids: torch.Tensor,
    grown_mask: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """Where each position of the caller's rows went in the grown rows: ``(B, T)`` indices into ``grown_ids``.

    ``input_ids`` / ``attention_mask`` ``(B, T)``: the rows as given (one ``<image>`` per image, any
    padding side); ``grown_ids`` / ``grown_mask`` ``(B, T')``: the same rows after
    :func:`expand_image_tokens`. A text token maps to itself; an ``<image>`` token to the last
    position of its image's vision tokens. The rows' real tokens are matched in order (text tokens
    one to one, each run of ``k`` image tokens to its run of ``R`` vision tokens, split evenly,
    which is exact when the images of a run are of one length; only the last image of a run is
    followed by text, and its position is always exact). Padded positions map to position 0 (their
    logits are never used).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    index = torch.zeros(input_ids.shape, dtype=torch.long)
    for b in range(input_ids.shape[0]):
        text_pos = attention_mask[b].nonzero().flatten()
        grown_pos = grown_mask[b].nonzero().flatten().tolist()
        ids, grown = input_ids[b, text_pos].tolist(), grown_ids[b, grown_mask[b].bool()].tolist()
        out: list[int] = []
        j = g = 0
        while j < len(ids):
            if ids[j] != image_token_id:
                out.append(grown_pos[g])
                j, g = j + 1, g + 1
                continue
            k = next((i for i in range(j, len(ids)) if ids[i] != image_token_id), len(ids)) - j
            r = next((i for i in range(g, len(grown)) if grown[i] != image_token_id), len(grown)) - g
            out += [grown_pos[g + (i + 1) * r // k - 1] for i in range(k)]
            j, g = j + k, g + r
        index[b, text_pos.cpu()] = torch.tensor(out, dtype=torch.long)
    return index.to(grown_ids.device)


def logits_at_text_positions(logits: torch.Tensor, index: torch.Tensor, logits_to_keep: int | torch.Tensor = 0):
    """The grown rows' ``logits`` ``(B, T', V)`` at the caller's positions (``index`` from
    :func:`text_positions`) -> ``(B, T, V)``; ``logits_to_keep`` picks positions as transformers'
    argument does (an int: the last that many, 0 all; a tensor: those positions)."""
    if torch.is_tensor(logits_to_keep):
        index = index[:, logits_to_keep.to(index.device)]
    elif logits_to_keep:
        index = index[:, -logits_to_keep:]
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


def forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_embeds: torch.Tensor | None,
    past_key_values,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    use_cache: bool | None,
    logits_to_keep,
    hidden_states_only: bool = False,
    decoding: bool = False,
    **kwargs,
):
    """The token-insertion forward: ``(loss, logits, past_key_values)`` as an ``InterleafOutput``; with
    ``replace``, logits at the caller's positions and the cache of the grown rows (module docstring).
    ``hidden_states_only``: the LM's final hidden states instead (``BaseModelOutputWithPast``, at the
    caller's positions likewise), for ``model.base_model``. ``decoding``: generate's decoding step
    (the input continues the cached prompt), known without reading a static cache's length."""
    from .modeling import InterleafOutput

    cached = bool(cached_prefix(past_key_values, decoding))  # read on the host only for a static cache's prompt
    image_sizes = xgenmm.sizes_from_kwargs(kwargs)  # (H, W) for LLaVA-NeXT, (W, H) for xGen-MM
    if not cached:  # xGen-MM's base format: <image> + placeholders are the image's positions
        input_ids = xgenmm.overwrite_spans(model, input_ids, attention_mask)
    index = None  # replace: where each of the caller's positions went in the grown rows
    if pixel_values is not None:
        if image_embeds is not None:
            raise InputError("pass either pixel_values or image_embeds, not both")
        if cached:
            raise InputError("new images cannot be added after a cached prefix; run the whole prompt with its images")
    if pixel_values is not None and xgenmm.is_anyres(model):
        text_ids, text_mask = input_ids, attention_mask
        input_ids, attention_mask, labels, image_embeds = xgenmm.prepare_replace(
            model, input_ids, attention_mask, labels, pixel_values, image_sizes
        )
        index = text_positions(text_ids, text_mask, input_ids, attention_mask, model.image_token_id)
        position_ids = None
    elif pixel_values is not None:
        if model.config.insertion_cfg.placement == "replace":
            text_ids, text_mask = input_ids, attention_mask
            input_ids, attention_mask, labels = replace_placement(model, input_ids, attention_mask, labels)
            index = text_positions(text_ids, text_mask, input_ids, attention_mask, model.image_token_id)
            position_ids = None
        image_embeds = _encode(model, input_ids, pixel_values, image_sizes)
    image_id = model.image_token_id
    # after a cached prefix the input is generated text: an <image> token the model wrote is an ordinary
    # token there (transformers' LLaVA embeds it so too); images are written over the prompt's only
    is_image = input_ids == image_id if not cached else torch.zeros_like(input_ids, dtype=torch.bool)
    embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, D)
    if not cached:
        embeds = write_image_embeddings(embeds, input_ids, image_embeds, image_id)
    if position_ids is None and attention_mask is not None:  # left padding: positions count real tokens only
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1] :]
    if model._lm_accepts_position_ids and position_ids is not None:
        kwargs["position_ids"] = position_ids
    if hidden_states_only:
        return _hidden_states(model, embeds, attention_mask, past_key_values, use_cache, index, kwargs)
    out = model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        past_key_values=past_key_values,
        use_cache=use_cache,
        logits_to_keep=logits_to_keep if index is None else 0,  # grown rows: every logit, then mapped back
        return_dict=True,
        **kwargs,
    )
    loss = z = None
    if labels is not None:
        labels = labels.masked_fill(is_image.to(labels.device), IGNORE_INDEX)  # an image token is never a target
        loss, z = causal_lm_loss(out.logits, labels, model.config.z_loss)
    logits = out.logits if index is None else logits_at_text_positions(out.logits, index, logits_to_keep)
    return InterleafOutput(loss=loss, logits=logits, past_key_values=out.past_key_values, z_loss=z)


def _hidden_states(model, embeds, attention_mask, past_key_values, use_cache, index, kwargs):
    """The LM's base model on the fused embeddings -> its final hidden states at the caller's positions."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    out = model.language_model.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                          past_key_values=past_key_values, use_cache=use_cache, **kwargs)
    hidden = out.last_hidden_state if index is None else logits_at_text_positions(out.last_hidden_state, index)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=out.past_key_values)


def generate(model, generate_fn, input_ids, attention_mask, pixel_values, image_embeds, kwargs):
    """``generate`` for token insertion: images encoded once; then ``generate_fn`` (transformers') runs.

    With ``replace`` placement the prompt is grown first; the returned rows are the caller's
    prompt followed by the new tokens, as for every other model.
    """
    prompt = None  # the caller's rows, when the model grows them
    image_sizes = xgenmm.sizes_from_kwargs(kwargs)
    if pixel_values is not None:
        if image_embeds is not None:
            raise InputError("pass either pixel_values or image_embeds, not both")
        grown_ids, grown_mask, image_embeds = prepare_images(model, input_ids, attention_mask, pixel_values,
                                                             image_sizes)
        if grown_ids is not None:
            prompt, input_ids, attention_mask = input_ids, grown_ids, grown_mask
    if image_embeds is not None:
        kwargs["image_embeds"] = image_embeds
    out = generate_fn(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if prompt is None or not torch.is_tensor(out):
        return out
    prompt = prompt.to(out.device).repeat_interleave(out.shape[0] // prompt.shape[0], dim=0)
    return torch.cat([prompt, out[:, input_ids.shape[1] :]], dim=1)


def prepare_images(model, input_ids, attention_mask, pixel_values, image_sizes=None):
    """A prompt's images for generation, encoded once: ``(grown_ids, grown_mask, image_embeds)``.

    ``grown_ids`` / ``grown_mask`` are the prompt with each ``<image>`` replaced by its image's
    positions (``replace`` placement, xGen-MM's any-resolution images), None when the prompt keeps
    its length; ``image_embeds`` ``(B, S, D)`` go over the image positions of the (grown) prompt.
    """
    if xgenmm.is_anyres(model):
        grown_ids, grown_mask, _, image_embeds = xgenmm.prepare_replace(
            model, input_ids, attention_mask, None, pixel_values, image_sizes
        )
        return grown_ids, grown_mask, image_embeds
    grown_ids = grown_mask = None
    if model.config.insertion_cfg.placement == "replace":
        grown_ids, grown_mask, _ = replace_placement(model, input_ids, attention_mask, None)
        input_ids, attention_mask = grown_ids, grown_mask
    spans = xgenmm.overwrite_spans(model, input_ids, attention_mask)
    return grown_ids, grown_mask, _encode(model, spans, pixel_values, image_sizes)
