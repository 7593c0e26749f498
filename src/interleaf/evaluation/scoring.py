"""The model side of evaluation: batched generation and log-likelihood scoring.

``generate_batch`` pads prompts on the left (the model computes positions from the attention
mask), generates greedily or with beams, stops at end-of-chunk / EOS and the given stop strings,
and cuts the decoded text at the earliest stop string. ``score`` computes a context's keys and values
once and ranks every candidate continuation against them::

    context (1, T) ──► model ──► past K/V (1, H, T, Dh), media cache (1 row), last logits (1, V)
                               (T grows where a token-insertion model replaces each <image> by its embeddings)
    past K/V ──► batch_repeat_interleave(n) ──► (n, H, T, Dh)
    continuations, right-padded (n, C) ──► model(past, media rows r // n) ──► log-probs (n, C)
    -> [(sum of the continuation's token log-probs, number of tokens)] per continuation

Right padding of the continuations cannot change the scores of the real tokens (they come
before the padding), so scores do not depend on how candidates are batched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..generation import cut_at_stop, generation_kwargs


def _model_inputs(batch: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_batch(
    model: Any, processor: Any, prompts: Sequence[Any], *, max_new_tokens: int = 10, num_beams: int = 1,
    stop: Sequence[str] = (), length_penalty: float | None = None, batch_size: int = 8, compile: bool = False,
) -> list[str]:
    """Generate for each prompt (processor prompt items or chat messages); returns the new text,
    cut at the earliest stop string. Greedy results do not depend on ``batch_size``."""
    tok = processor.tokenizer
    specials = set(tok.all_special_tokens)
    text_stops = [s for s in stop if s not in specials]  # special tokens stop as EOS ids already
    kwargs = generation_kwargs(processor, max_new_tokens=max_new_tokens, num_beams=num_beams, stop=text_stops,
                               compile=compile)
    if length_penalty is not None and num_beams > 1:
        kwargs["length_penalty"] = length_penalty
    device = _device(model)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = processor(chunk, padding_side="left")
        inputs = {k: v.to(device) for k, v in _model_inputs(batch).items()}
        ids = model.generate(**inputs, **kwargs)
        new = ids[:, inputs["input_ids"].shape[1] :]
        for row in processor.batch_decode(new, skip_special_tokens=True):
            out.append(cut_at_stop(row, text_stops))
    return out


@torch.no_grad()
def score(
    model: Any, processor: Any, context: Any, continuations: Sequence[str], *, batch_size: int = 8,
) -> list[tuple[float, int]]:
    """``[(sum_logprob, n_tokens)]`` of each continuation after ``context`` (prompt items).

    The context runs once; its cache is expanded for up to ``batch_size`` continuations per
    forward. Continuations are tokenised on their own (no special tokens), so a template should
    put any separating space in the continuation (``" {candidate}"``).
    """
    device = _device(model)
    batch = processor([context], padding_side="left")
    inputs = {k: v.to(device) for k, v in _model_inputs(batch).items()}
    ctx_out = model(**inputs, use_cache=True)
    past, media = ctx_out.past_key_values, ctx_out.media_cache
    last_logprobs = torch.log_softmax(ctx_out.logits[:, -1].float(), dim=-1)  # (1, V)
    ctx_mask = _cache_mask(inputs["attention_mask"], past)  # (1, T_cache)
    encoded = [processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    results: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        n, width = len(chunk), max(1, max(len(c) for c in chunk))
        ids = torch.full((n, width), processor.pad_token_id, dtype=torch.long, device=device)  # (n, C)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)  # (n, C)
        for i, c in enumerate(chunk):
            if c:
                ids[i, : len(c)] = torch.tensor(c, device=device)
                mask[i, : len(c)] = 1
        cache = copy.deepcopy(past)
        cache.batch_repeat_interleave(n)  # (n, H, T, Dh) per layer
        out = model(
            input_ids=ids, attention_mask=torch.cat([ctx_mask.expand(n, -1), mask], dim=1), past_key_values=cache,
            media_cache=media, use_cache=True,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (n, C, V)
        # token j of a continuation is predicted by position j - 1 (the context's last for j = 0)
        pred = torch.cat([last_logprobs.expand(n, -1)[:, None], logprobs[:, :-1]], dim=1)  # (n, C, V)
        token_lp = pred.gather(-1, ids[..., None])[..., 0] * mask  # (n, C)
        for i, c in enumerate(chunk):
            results.append((float(token_lp[i].sum()), len(c)))
    return results


def _cache_mask(mask: torch.Tensor, past: Any) -> torch.Tensor:
    """The attention mask of the context's cache ``(1, T_cache)``: the context's own mask, or, where
    the model grew the row (a token-insertion model that replaces each ``<image>`` by the image's
    embeddings), ones over the grown length: the context is one row, so it has no padding."""
    length = past.get_seq_length()
    if mask.shape[1] == length:
        return mask
    if not bool(mask.all()):
        raise RuntimeError(f"the context's cache holds {length} positions for a padded row of {mask.shape[1]}")
    return mask.new_ones((mask.shape[0], length))


def reduce_scores(scores: Sequence[tuple[float, int]], how: str = "sum") -> list[float]:
    """Sum or mean log-prob per candidate (mean: divided by the candidate's token count)."""
    if how == "mean":
        return [s / max(n, 1) for s, n in scores]
    return [s for s, _ in scores]
