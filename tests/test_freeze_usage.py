"""Freeze policies train only what the model uses: per family and policy, which parameters train and
how many elements that is, and after a few optimiser steps every trainable parameter has moved.

Token insertion writes the image's embeddings over every ``<image>`` position, so the added input
row of ``<image>`` is never read: it is frozen (a whole table when it is the only added row, one
row of it otherwise), while the added output rows, whose logits are computed, keep training. The
cross-attention family reads ``<image>`` as a token and keeps every added row trainable.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.families import FAMILIES, build_family, stage_model

from interleaf.data.collate import collate
from interleaf.data.tokenize import tokenize_pair
from interleaf.model.embeddings import DecoupledEmbedding
from interleaf.training.config import load_recipe
from interleaf.training.prepare import prepare_model

RED = Image.new("RGB", (40, 30), (220, 20, 20))
EMBED_EXTRA = "language_model.model.embed_tokens.extra"
HEAD_EXTRA = "language_model.lm_head.extra"
# each family's policies, and what the names of the parameters each one trains hold (besides the added rows)
POLICY_PARTS = {
    "cross_attention": {"flamingo": ("resampler.", "cross_attention"), "unfreeze_lm": ("resampler.", "language_model."),
                        "all_trainable": ("",)},
    "expand": {"projector": ("projector.",), "projector_lm": ("projector.", "language_model."), "all_trainable": ("",)},
    "replace": {"projector": ("projector.",), "projector_lm": ("projector.", "language_model."), "all_trainable": ("",)},
}
# token insertion in a format that also writes a token the LM reads (<|endofchunk|>): two added rows, one read
PARTIAL = dict(tokens={"prompt_format": "openflamingo", "image_seq_length": 1})


def _family(family: str):
    if family == "replace_chunks":
        return build_family("replace", **PARTIAL)
    return build_family(family)


def _part(name: str, parts: tuple[str, ...]) -> bool:
    return any(part in name for part in parts)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _embedding(model) -> DecoupledEmbedding:
    emb = model.get_input_embeddings()
    assert isinstance(emb, DecoupledEmbedding)
    return emb


@pytest.mark.parametrize("family", FAMILIES)
def test_each_policy_trains_its_parts_and_the_count_is_theirs(family):
    model, _ = build_family(family)
    inserts = family != "cross_attention"
    for policy, prefixes in POLICY_PARTS[family].items():
        n = model.apply_freeze(policy)
        trainable = _trainable(model)
        assert all(_part(name, prefixes) or name.endswith(".extra") for name in trainable), policy
        assert HEAD_EXTRA in trainable  # every added token's logit is computed: its output row trains
        # the <image> input row: read by the cross-attention family, overwritten by token insertion
        assert (EMBED_EXTRA in trainable) == (not inserts or policy == "all_trainable"), policy
        assert n == model.num_trainable_parameters() == sum(p.numel() for p in trainable.values())
        if policy != "all_trainable":  # the parts named, and nothing else
            used = [(name, p) for name, p in model.named_parameters() if not (inserts and name == EMBED_EXTRA)]
            expected = {id(p): p.numel() for name, p in used if _part(name, prefixes) or name.endswith(".extra")}
            assert n == sum(expected.values()), policy
        if inserts and policy == "projector":
            assert {name.split(".")[0] for name in trainable} == {"projector", "language_model"}
            assert [name for name in trainable if name.startswith("language_model.")] == [HEAD_EXTRA]


def test_an_added_row_that_is_read_trains_while_the_image_row_is_frozen_on_its_own():
    model, processor = _family("replace_chunks")
    tokens = model.config.tokens_cfg
    assert tokens.num_extra == 2 and tokens.image_token_id == tokens.extra_start  # <image>, then <|endofchunk|>
    emb = _embedding(model)
    for policy in ("projector", "projector_lm"):
        n = model.apply_freeze(policy)
        assert emb.extra.requires_grad and emb.frozen_rows == (0,)
        everything = sum(p.numel() for p in _trainable(model).values())
        assert n == model.num_trainable_parameters() == everything - emb.extra.shape[1]  # less the <image> row
    n_all = model.apply_freeze("all_trainable")
    assert emb.frozen_rows == () and n_all == model.num_parameters()


def _batch(model, processor, rows: int = 2) -> dict:
    """Pairs written as training writes them (``<image>`` untrained, the caption and what ends it trained)."""
    samples = []
    for caption in ("a red square", "a red thing on black")[:rows]:
        t = tokenize_pair(processor, caption, task_prompt="describe:")
        samples.append({"input_ids": t.input_ids, "labels": t.labels, "images": [processor.image_transform(RED)]})
    return collate(samples, processor.pad_token_id)


def _policies(family: str) -> list[str]:
    return list(POLICY_PARTS["replace" if family == "replace_chunks" else family])


@pytest.mark.parametrize("family, policy", [(f, p) for f in (*FAMILIES, "replace_chunks") for p in _policies(f)])
def test_after_a_few_steps_every_trainable_parameter_has_moved(family, policy):
    """The training set-up (``prepare_model``) under every policy: no trainable parameter is dead,
    and a row frozen on its own does not move."""
    model, processor = _family(family)
    own = PARTIAL if family == "replace_chunks" else {}
    stage = load_recipe({"model": {**stage_model(family.split("_chunks")[0]), **own}, "freeze": policy}).stages[0]
    torch.manual_seed(0)
    n = prepare_model(model, stage)
    trainable = _trainable(model)
    assert n == sum(p.numel() for p in trainable.values()) - sum(
        m.num_frozen_elements() for m in model.modules() if isinstance(m, DecoupledEmbedding))
    before = {name: p.detach().clone() for name, p in trainable.items()}
    batch = _batch(model, processor)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
        out.loss.backward()
        if step == 0:
            no_grad = [name for name, p in trainable.items() if p.grad is None or not bool(p.grad.any())]
            assert not no_grad, (family, policy, no_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    still = [name for name, p in trainable.items() if torch.equal(p.detach(), before[name])]
    assert not still, (family, policy, still)
    emb = _embedding(model)
    if EMBED_EXTRA in trainable:
        moved = (emb.extra.detach() != before[EMBED_EXTRA]).any(-1).tolist()
        assert moved == [i not in emb.frozen_rows for i in range(emb.num_extra)], (family, policy, moved)
    if family != "cross_attention":
        assert 0 in emb.frozen_rows or not emb.extra.requires_grad  # the <image> row never trains
