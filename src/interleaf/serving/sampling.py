"""Choosing each running row's next token from its logits, every row by its own settings.

A continuous batch holds greedy and sampled rows side by side, each with its own temperature,
top_p and seed, so the choice is made per row (vectorised over the rows that share a rule):

- greedy rows: ``argmax``;
- sampled rows: the logits divided by the row's temperature, then top_p (nucleus) filtering, then
  one draw from the softmax. These are the steps, in the order and with the arithmetic of
  transformers' ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` (``min_tokens_to_keep=1``), so a
  row samples from the distribution ``model.generate`` would;
- a job with a ``seed`` draws from a ``torch.Generator`` of its own (one per job, shared by its
  ``n`` rows), so its answer does not depend on what else runs in the batch; unseeded rows draw
  from torch's global generator.

Logits are taken in float32, as ``generate`` does.
"""

from __future__ import annotations

import torch

from .jobs import Sampling


def seeded_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A job's own random generator when it asked for a seed (sampled jobs only), else None."""
    if sampling.seed is None or sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


def nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits`` (R, V) with the tokens outside each row's top_p nucleus at -inf; ``top_p`` (R, 1).
    The most likely token always stays (transformers' ``TopPLogitsWarper`` with one token kept)."""
    ordered, order = torch.sort(logits, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)  # (R, V), ascending
    drop = cumulative <= (1 - top_p)
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def choose_tokens(logits: torch.Tensor, samplings: list[Sampling],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row (R,), from its logits (R, V) and its ``Sampling``; ``generators[r]`` is
    row r's job's own generator (None: the global one). Rows of one seeded job share its generator and
    draw in row order."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # (R,)
    sampled = [r for r, s in enumerate(samplings) if not s.greedy]
    if not sampled:
        return tokens
    device = logits.device
    index = torch.tensor(sampled, device=device)
    temperature = torch.tensor([samplings[r].temperature for r in sampled], device=device)[:, None]
    top_p = torch.tensor([samplings[r].top_p for r in sampled], device=device, dtype=torch.float32)[:, None]
    scores = logits[index] / temperature
    if any(samplings[r].top_p < 1.0 for r in sampled):
        scores = nucleus(scores, top_p)
    probs = scores.softmax(dim=-1)  # (S, V)
    groups: dict[int, list[int]] = {}  # generator -> positions among the sampled rows, in row order
    for k, r in enumerate(sampled):
        groups.setdefault(id(generators[r]), []).append(k)
    for positions in groups.values():
        generator = generators[sampled[positions[0]]]
        where = torch.tensor(positions, device=device)
        drawn = torch.multinomial(probs[where], num_samples=1, generator=generator).squeeze(1)
        tokens[index[where]] = drawn
    return tokens
