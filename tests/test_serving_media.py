"""The model seam the server uses for both fusion families: ``model.prepare_media`` gives a batch's
per-call image state (cross-attention: a ``MediaCache``; token insertion: ``InsertedImages``) with
``.select(rows)``; ``generate`` continues from it and a KV cache over several calls, rows dropped between
calls, and gives what one ``generate`` call gives for the whole batch."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from interleaf.errors import InputError
from interleaf.model import InsertedImages, MediaCache
from helpers.serving import ANYRES, one_token_per_image, png, replace_twin, tiny_model

KINDS = ["tiny-random", "tiny-llava", "tiny-llava-replace"]
RED, BLUE = png((220, 20, 20), (40, 30)), png((20, 20, 220), (30, 40))


def model_and_batch(kind: str):
    """(model, batch): three rows with 2, 0 and 1 images and different lengths, left-padded."""
    model, processor = tiny_model(kind.removesuffix("-replace"))  # any resolution: each image its views and size
    batch = processor([["look", RED, "and", BLUE, "what are they?"], ["a question without images"], [RED, "red?"]])
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in batch}
    if kind.endswith("-replace"):
        model = replace_twin(model)
        batch = one_token_per_image(batch, processor.image_token_id, processor.pad_token_id)
    return model.eval(), batch


def grow(ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(out.shape[0], out.shape[1] - ids.shape[1])], dim=1)


@pytest.mark.parametrize("kind", [*KINDS, *ANYRES])
@torch.no_grad()
def test_rounds_with_rows_dropped_equal_one_generate_call(kind):
    model, batch = model_and_batch(kind)
    greedy = dict(do_sample=False, pad_token_id=0)
    want = model.generate(**batch, max_new_tokens=9, **greedy)
    assert want.shape[1] == batch["input_ids"].shape[1] + 9  # the caller's prompt, then the new tokens
    media = model.prepare_media(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                batch.get("image_sizes"))
    assert isinstance(media, MediaCache if kind == "tiny-random" else InsertedImages)
    ids, mask, cache = batch["input_ids"], batch["attention_mask"], DynamicCache()
    for step in range(3):
        out = model.generate(input_ids=ids, attention_mask=mask, media_cache=media, past_key_values=cache,
                             max_new_tokens=3, **greedy)
        ids, mask = out, grow(ids, mask, out)
        if step == 0:  # the middle row leaves; the others swap places
            keep = torch.tensor([2, 0])
            ids, mask, media = ids[keep], mask[keep], media.select(keep)
            cache.batch_select_indices(keep)
    assert torch.equal(ids, want[[2, 0]])


@pytest.mark.parametrize("kind", KINDS[1:])
@torch.no_grad()
def test_inserted_images_refuse_what_they_were_not_prepared_for(kind):
    model, batch = model_and_batch(kind)
    media = model.prepare_media(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(InputError, match="does not continue the batch media_cache was prepared for"):
        model.generate(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2],
                       media_cache=media, **kwargs)
    with pytest.raises(InputError, match="does not continue the batch"):
        model.generate(input_ids=batch["input_ids"][:, 1:], attention_mask=batch["attention_mask"][:, 1:],
                       media_cache=media, **kwargs)
    with pytest.raises(InputError, match="not more than one"):
        model.generate(**batch, media_cache=media, **kwargs)
    with pytest.raises(InputError, match="prepare it with model.prepare_media"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], media_cache=object(),
                       **kwargs)
    with pytest.raises(InputError, match="media_cache from prepare_media is for generate"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], media_cache=media)



@pytest.mark.parametrize("kind", ["tiny-llava", *ANYRES])
@torch.no_grad()
def test_an_image_token_the_model_generates_is_an_ordinary_token(kind):
    """A generated ``<image>`` is text: embedded as its own row, as transformers' LLaVA does, never an image
    (a server batch would otherwise fail, or write a prompt image's features over it)."""
    model, processor = tiny_model(kind)
    batch = processor([["a question without images"]])
    image, width = model.image_token_id, batch["input_ids"].shape[1]
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                         do_sample=False, pad_token_id=0, sequence_bias={(image,): 1e4}, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences[0, width:].tolist() == [image] * 3
    ids = out.sequences[:, :-1]  # the prompt and the first two <image> tokens, all embedded as text
    plain = model.language_model(inputs_embeds=model.get_input_embeddings()(ids)).logits[:, -1]
    assert (out.logits[2] - plain).abs().max() <= 1e-4
