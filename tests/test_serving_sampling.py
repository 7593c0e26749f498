"""Each running row chooses its token by its own settings: the temperature and top_p steps are
transformers' ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` row by row, a seeded job draws from its
own generator whatever runs beside it, and greedy rows take the argmax."""

from __future__ import annotations

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from interleaf.serving.jobs import Sampling
from interleaf.serving.sampling import choose_tokens, nucleus, seeded_generator


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_nucleus_equals_transformers_top_p_row_by_row():
    logits = _logits(4)
    top_p = [0.3, 0.9, 1.0, 0.05]
    ours = nucleus(logits, torch.tensor(top_p)[:, None])
    for r, p in enumerate(top_p):
        theirs = TopPLogitsWarper(top_p=p, min_tokens_to_keep=1)(None, logits[r:r + 1])[0]
        assert torch.equal(ours[r], theirs), p


def test_a_sampled_row_draws_what_generate_would_with_the_same_seed():
    """temperature -> top_p -> softmax -> multinomial, in transformers' arithmetic, from the job's generator."""
    logits = _logits(3, seed=1)
    sampling = Sampling(temperature=0.7, top_p=0.8, seed=11)
    others = [Sampling(), Sampling(temperature=1.3, top_p=0.5)]
    for position in range(3):  # the seeded row among greedy and other sampled rows, anywhere in the batch
        samplings = others[:position] + [sampling] + others[position:]
        generators = [seeded_generator(s, torch.device("cpu")) for s in samplings]
        drawn = choose_tokens(logits, samplings, generators)[position].item()
        scores = TemperatureLogitsWarper(0.7)(None, logits[position:position + 1])
        scores = TopPLogitsWarper(top_p=0.8, min_tokens_to_keep=1)(None, scores)
        want = torch.multinomial(scores.softmax(-1), 1, generator=torch.Generator().manual_seed(11)).item()
        assert drawn == want


def test_greedy_rows_take_the_argmax_and_seeded_jobs_repeat_their_draws():
    logits = _logits(5, seed=2)
    samplings = [Sampling(), Sampling(temperature=0.9, seed=3), Sampling(temperature=0.9, seed=3), Sampling(),
                 Sampling(temperature=0.9, seed=4)]
    device = torch.device("cpu")
    shared = seeded_generator(samplings[1], device)  # one job with n=2: its rows share one generator
    generators = [None, shared, shared, None, seeded_generator(samplings[4], device)]
    tokens = choose_tokens(logits, samplings, generators)
    assert tokens[0] == logits[0].argmax() and tokens[3] == logits[3].argmax()
    shared = seeded_generator(samplings[1], device)
    again = choose_tokens(logits, samplings, [None, shared, shared, None, seeded_generator(samplings[4], device)])
    assert torch.equal(tokens, again)
    assert seeded_generator(Sampling(temperature=0.0, seed=3), device) is None  # greedy needs no generator
