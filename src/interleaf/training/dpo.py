"""DPO stages: preference pairs, the sigmoid DPO loss, a frozen reference, and the step that
trains on them (``objective: dpo``; the config is :class:`~interleaf.training.config.DPOConfig`).

One optimiser step reads ``batch_size`` pairs (``format: preference`` samples, see
:mod:`interleaf.data.preference`); each micro-batch of ``B`` pairs is one forward pass over ``2B``
rows (chosen rows, then rejected rows). With the sequence log-probabilities ``pi`` (the policy, the
model being trained) and ``ref`` (the reference) of each pair's answer, summed over its tokens
(:func:`~interleaf.model.loss.sequence_logps`), and the per-pair loss ``l_i`` of
:func:`~interleaf.model.loss.dpo_loss`, the step's loss over the global batch is::

    L = sum_i w_i l_i / sum_i w_i          (w_i: the source's loss_weight)

summed over every micro-batch and process before the division, so its gradient does not depend
on the split (as for the language-modelling loss, see :mod:`interleaf.training.loop`).

The reference is the stage's starting model (built, loaded or taken from an earlier stage, before
any step or restored checkpoint), in eval mode, without gradients:

- ``reference: model`` keeps a frozen copy of it: the weights twice in memory (under FSDP the copy
  is not sharded: each process holds all of it), one extra forward pass per micro-batch;
- ``reference: cached`` scores every pair of the stage's preference sources once, before the first
  step (each process a share, then shared with all), and keeps two floats per pair. No second
  model, and the same numbers as ``model`` (up to float rounding of a differently padded batch).
  The cache is not written into checkpoints: a resumed run rebuilds the starting model and scores
  the pairs again, which gives the same values (the model and the tokenisation are deterministic).

The metrics of each logged step, over its global batch, carry TRL's names: ``rewards/chosen``
and ``rewards/rejected`` (the mean of ``beta * (pi - ref)`` on each side), ``rewards/margins``
(their difference), ``rewards/accuracies`` (the share of pairs whose chosen reward is the larger),
``logps/chosen`` and ``logps/rejected`` (the policy's mean sequence log-probabilities); ``loss`` is
the step's ``L`` and ``loss_by_source`` each source's mean DPO loss per pair since the last record.

Training, like the rest of the trainer, calls only the processor and the model's ``forward``, so
it works for every model family.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError, InterleafError, TrainingError
from ..model.loss import dpo_loss, sequence_logps
from .config import StageConfig
from .distributed import DistState, all_reduce_sum, gather_objects
from .step import StepOutcome, _no_sync, _take, apply_update, lm_tokens

# batch keys that are not model inputs
_NOT_INPUTS = ("labels", "loss_weight", "pairs")


def check_stage_data(stage: StageConfig) -> None:
    """A DPO stage reads ``format: preference`` sources only, and only a DPO stage reads them.

    Raises :class:`ConfigError` naming the first source that breaks the rule. A stage without
    ``data`` (a custom stream) is not checked here: the step checks each sample. A language-modelling
    stage whose mixture does not load is left to its stream, which reports it as it always has.
    """
    if stage.data is None:
        return
    try:
        mixture = stage.mixture(check_files=False)
    except InterleafError:
        if stage.objective == "dpo":
            raise
        return
    for i, source in enumerate(mixture.sources):
        is_preference = source.format == "preference"
        if stage.objective == "dpo" and not is_preference:
            raise ConfigError(
                f"data.sources[{i}].format",
                f"stage {stage.name!r} is a DPO stage, but source {source.name!r} is {source.format!r} data",
                "a DPO stage trains on preference pairs only: give it sources with format: preference "
                "(prompt, chosen, rejected; see interleaf.data.preference), or set objective: lm",
            )
        if stage.objective != "dpo" and is_preference:
            raise ConfigError(
                f"data.sources[{i}].format",
                f"source {source.name!r} holds preference pairs, which only a DPO stage trains on",
                "set objective: dpo and dpo: {reference: model} (or cached) on this stage, or use llava data",
            )


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The batch's tensors the model's ``forward`` takes (everything but the labels and weights)."""
    return {k: v.to(device) for k, v in batch.items() if k not in _NOT_INPUTS and torch.is_tensor(v)}


def _autocast(stage: StageConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=stage.precision == "bf16")


def _pairs(samples: list[dict], where: str) -> list[dict]:
    from ..data.preference import is_preference_sample

    for s in samples:
        if not is_preference_sample(s):
            raise ConfigError(
                "data", f"{where}: the data stream gave a sample that is not a preference pair (key {s.get('key')!r})",
                "a DPO stage reads sources with format: preference (prompt, chosen, rejected)",
            )
    return samples


# --------------------------------------------------------------------------- references


class ModelReference:
    """A frozen copy of the starting model; scores each micro-batch with one more forward pass."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logps(self, samples: list[dict], batch: dict, stage: StageConfig, device: torch.device):
        """The reference's ``(chosen, rejected)`` sequence log-probabilities, each (B,)."""
        with _autocast(stage, device):
            out = self.model(**model_inputs(batch, device))
        logps, _ = sequence_logps(out.logits, batch["labels"])
        n = batch["pairs"]
        return logps[:n], logps[n:]


class CachedReference:
    """The starting model's log-probabilities of every pair, computed once: ``(source, pair)`` -> (chosen, rejected)."""

    def __init__(self, table: dict[tuple[str, str], tuple[float, float]]):
        self.table = table

    def logps(self, samples: list[dict], batch: dict, stage: StageConfig, device: torch.device):
        try:
            values = [self.table[(s["source"], s["pair"])] for s in samples]
        except KeyError as e:
            raise TrainingError(
                f"stage {stage.name!r}: the pair {e.args[0]!r} has no cached reference log-probabilities (the cache "
                "holds the pairs of the stage's preference sources, read before training); a custom data stream "
                "needs dpo.reference: model"
            ) from None
        t = torch.tensor(values, dtype=torch.float32, device=device)  # (B, 2)
        return t[:, 0], t[:, 1]


def _all_pairs(stage: StageConfig, processor, rank: int, world_size: int) -> Iterable[dict]:
    """This process's share (every ``world_size``-th entry) of every preference source, in file order,
    tokenised as the stage's stream tokenises them; bad samples are left out (the stream counts them)."""
    from ..data.conversion import iter_parsed
    from ..data.formats import BadSample
    from ..data.preference import encode_preference

    mixture = stage.mixture()
    max_length = mixture.max_length or getattr(processor, "max_length", None)
    index = 0
    for cfg in mixture.sources:
        for parsed in iter_parsed(cfg):  # JSON entries or parquet rows, in file order
            index += 1
            if (index - 1) % world_size != rank or isinstance(parsed, BadSample):
                continue
            try:
                yield encode_preference(
                    parsed, processor, source=cfg.name, max_length=max_length, max_images=cfg.max_images,
                    loss_weight=cfg.loss_weight,
                )
            except BadSample:
                continue


def cache_reference(
    stage: StageConfig, model: nn.Module, processor, dist: DistState, batch_pairs: int
) -> CachedReference:
    """Score every pair of the stage's preference sources with ``model`` (the starting model, not
    wrapped) in eval mode and without gradients; each process scores a share, then all share the table."""
    from ..data.preference import collate_preference

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    local: dict[tuple[str, str], tuple[float, float]] = {}
    pairs = iter(_all_pairs(stage, processor, dist.rank, dist.world_size))
    with torch.no_grad():
        while chunk := list(itertools.islice(pairs, batch_pairs)):
            batch = collate_preference(chunk, processor.pad_token_id)
            with _autocast(stage, device):
                logits = model(**model_inputs(batch, device)).logits
            logps = sequence_logps(logits, batch["labels"])[0].float().cpu().tolist()
            for i, s in enumerate(chunk):
                local[(s["source"], s["pair"])] = (logps[i], logps[len(chunk) + i])
    model.train(was_training)
    table: dict[tuple[str, str], tuple[float, float]] = {}
    for part in gather_objects(local, dist):
        table.update(part)
    if dist.is_main:
        print(f"stage {stage.name!r}: reference log-probabilities of {len(table):,} pairs computed and cached", flush=True)
    return CachedReference(table)


def build_reference(stage: StageConfig, model: nn.Module, processor, dist: DistState, batch_pairs: int):
    """The stage's reference from its starting ``model`` (before wrapping and before any step)."""
    assert stage.dpo is not None
    if stage.dpo.reference == "model":
        return ModelReference(model)
    return cache_reference(stage, model, processor, dist, max(1, batch_pairs))


# --------------------------------------------------------------------------- the step


def dpo_step(stage: StageConfig, trainee, dist: DistState) -> StepOutcome:
    """One DPO optimiser step at the learning rate already set (see the module docstring).

    ``trainee`` is the stage's :class:`~interleaf.training.prepare.Trainee` with its ``reference``.
    """
    from ..data.preference import collate_preference

    dpo, device = stage.dpo, dist.device
    assert dpo is not None
    raw = [_pairs(_take(trainee.stream, trainee.micro), f"stage {stage.name!r}") for _ in range(stage.grad_accum)]
    batches = [collate_preference(samples, trainee.processor.pad_token_id) for samples in raw]
    local_den = sum(float(b["loss_weight"][: b["pairs"]].sum()) for b in batches)
    den = max(float(all_reduce_sum(torch.tensor([local_den], dtype=torch.float64), dist)[0]), 1e-12)
    # weighted loss, chosen and rejected rewards, correct pairs, pairs, tokens, trained tokens, chosen and rejected logps
    totals = torch.zeros(9, dtype=torch.float64)
    by_source: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for j, (samples, b) in enumerate(zip(raw, batches)):
        n = b["pairs"]
        with _no_sync(trainee.wrapped, j == len(batches) - 1), _autocast(stage, device):
            out = trainee.wrapped(**model_inputs(b, device))
        logps, counts = sequence_logps(out.logits, b["labels"])
        ref_chosen, ref_rejected = trainee.reference.logps(samples, b, stage, device)
        losses, chosen, rejected = dpo_loss(
            logps[:n], logps[n:], ref_chosen.float(), ref_rejected.float(), dpo.beta, dpo.label_smoothing
        )
        w = b["loss_weight"][:n].to(losses.device, losses.dtype)
        ((w * losses).sum() / den * dist.world_size).backward()
        totals += torch.tensor([
            float((w * losses).detach().sum()), float(chosen.sum()), float(rejected.sum()),
            float((chosen > rejected).sum()), n, float(lm_tokens(b)), float(counts.sum()),
            float(logps[:n].detach().sum()), float(logps[n:].detach().sum()),
        ], dtype=torch.float64)
        for s, loss in zip(samples, losses.detach().tolist()):
            by_source[s.get("source", "data")][0] += loss
            by_source[s.get("source", "data")][1] += 1
    totals = all_reduce_sum(totals, dist)
    step_loss = float(totals[0] / den)
    grad_norm, finite = apply_update(stage, trainee.optimizer, trainee.params, step_loss)
    pairs = max(float(totals[4]), 1.0)
    metrics = {
        "rewards/chosen": float(totals[1]) / pairs, "rewards/rejected": float(totals[2]) / pairs,
        "rewards/margins": float(totals[1] - totals[2]) / pairs, "rewards/accuracies": float(totals[3]) / pairs,
        "logps/chosen": float(totals[7]) / pairs, "logps/rejected": float(totals[8]) / pairs,
    }
    return StepOutcome(
        loss=step_loss, grad_norm=grad_norm, finite=finite, z_mean=0.0, tokens=int(totals[5]), trained=int(totals[6]),
        by_source=by_source, metrics=metrics,
    )


__all__ = [
    "CachedReference", "ModelReference", "build_reference", "cache_reference", "check_stage_data", "dpo_step",
    "model_inputs",
]
