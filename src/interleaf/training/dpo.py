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
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, InterleafError, TrainingError
from ..model.loss import dpo_loss, sequence_logps, trained_tokens
from .config import StageConfig
from .distributed import DistState, all_reduce_sum, gather_objects
from .step import StepOutcome, _no_sync, _take, finish_update, lm_tokens, read_with_grad_norm, to_device

# batch keys that are not model inputs
_NOT_INPUTS = ("labels", "loss_weight", "pairs")
# model inputs the model reads on the host (any-resolution image sizes, which lay out the images): kept there
_HOST_INPUTS = ("image_sizes",)


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
    """The batch's tensors the model's ``forward`` takes (everything but the labels and weights), on
    ``device``; ``image_sizes`` stays on the host, where the model reads it."""
    return {k: v if k in _HOST_INPUTS else to_device(v, device)
            for k, v in batch.items() if k not in _NOT_INPUTS and torch.is_tensor(v)}


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
        logps, _ = sequence_logps(out.logits, to_device(batch["labels"], device))
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
        t = to_device(torch.tensor(values, dtype=torch.float32), device)  # (B, 2)
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


@dataclass
class PairPlan:
    """What the host knows of a DPO step's micro-batches from their collated CPU tensors (see
    :class:`interleaf.training.step.StepPlan`): global sums and each row's source."""

    den: float  # sum of the pairs' weights over the global batch, at least 1e-12
    counts: tuple[int, int, int]  # pairs, tokens, trained tokens over the global batch
    sources: list[str]  # the sources of this process's pairs, in order of first appearance
    rows: list[torch.Tensor]  # per micro-batch: each pair's index in ``sources`` (long, CPU)
    source_pairs: list[float]  # per source: this process's pairs


def plan_pairs(raw: list[list[dict]], batches: list[dict], dist: DistState) -> PairPlan:
    """Count on the collated CPU batches; with several processes the global sums are one all-reduce, read once."""
    local = torch.tensor([
        sum(float(b["loss_weight"][: b["pairs"]].sum()) for b in batches), sum(b["pairs"] for b in batches),
        sum(lm_tokens(b) for b in batches), sum(int(trained_tokens(b["labels"]).sum()) for b in batches),
    ], dtype=torch.float64)
    if dist.enabled:
        local = all_reduce_sum(local.to(dist.device), dist).cpu()
    den, pairs, tokens, trained = local.tolist()
    sources: dict[str, int] = {}
    rows = [torch.tensor([sources.setdefault(s.get("source", "data"), len(sources)) for s in samples]) for samples in raw]
    source_pairs = [0.0] * len(sources)
    for index in rows:
        for i in index.tolist():
            source_pairs[i] += 1
    return PairPlan(max(den, 1e-12), (int(pairs), int(tokens), int(trained)), list(sources), rows, source_pairs)


def _micro_batch(
    stage: StageConfig, trainee, samples: list[dict], b: dict, rows: torch.Tensor, den: float, dist: DistState,
    sync: bool, sums: torch.Tensor, by_source: torch.Tensor,
) -> None:
    """Forward and backward one micro-batch of pairs; add its sums to ``sums`` (float64 (6,), on the
    device: weighted loss, chosen and rejected rewards, correct pairs, chosen and rejected logps) and
    each pair's loss to its source's entry of ``by_source``. Reads nothing back from the device."""
    dpo, device, n = stage.dpo, dist.device, b["pairs"]
    labels = to_device(b["labels"], device)
    with _no_sync(trainee.wrapped, sync), _autocast(stage, device):
        out = trainee.wrapped(**model_inputs(b, device))
    logps, _ = sequence_logps(out.logits, labels)
    ref_chosen, ref_rejected = trainee.reference.logps(samples, b, stage, device)
    losses, chosen, rejected = dpo_loss(
        logps[:n], logps[n:], ref_chosen.float(), ref_rejected.float(), dpo.beta, dpo.label_smoothing
    )
    w = to_device(b["loss_weight"][:n].to(losses.dtype), device)
    ((w * losses).sum() / den * dist.world_size).backward()
    parts = [(w * losses).detach().sum(), chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
             logps[:n].detach().sum(), logps[n:].detach().sum()]
    sums += torch.stack([x.double() for x in parts])
    by_source.index_add_(0, to_device(rows, device), losses.detach().double())


def dpo_step(stage: StageConfig, trainee, dist: DistState) -> StepOutcome:
    """One DPO optimiser step at the learning rate already set (see the module docstring).

    ``trainee`` is the stage's :class:`~interleaf.training.prepare.Trainee` with its ``reference``.
    As in :func:`interleaf.training.step.optimizer_step`, a micro-batch reads nothing back from the
    device; the step reads its sums and the gradient norm once, to decide whether to update.
    """
    from ..data.preference import collate_preference

    assert stage.dpo is not None
    raw = [_pairs(_take(trainee.stream, trainee.micro), f"stage {stage.name!r}") for _ in range(stage.grad_accum)]
    batches = [collate_preference(samples, trainee.processor.pad_token_id) for samples in raw]
    plan = plan_pairs(raw, batches, dist)
    sums = torch.zeros(6, dtype=torch.float64, device=dist.device)
    by_source = torch.zeros(len(plan.sources), dtype=torch.float64, device=dist.device)  # DPO loss per source
    for j, (samples, b) in enumerate(zip(raw, batches)):
        _micro_batch(stage, trainee, samples, b, plan.rows[j], plan.den, dist, j == len(batches) - 1, sums, by_source)
    (wloss, chosen, rejected, correct, logp_chosen, logp_rejected), grad_norm = read_with_grad_norm(
        all_reduce_sum(sums, dist), stage, trainee.params
    )
    step_loss = wloss / plan.den
    grad_norm = grad_norm if math.isfinite(step_loss) else math.nan
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    finish_update(trainee.optimizer, finite)
    pairs_, tokens, trained = plan.counts
    pairs = max(float(pairs_), 1.0)
    metrics = {
        "rewards/chosen": chosen / pairs, "rewards/rejected": rejected / pairs,
        "rewards/margins": (chosen - rejected) / pairs, "rewards/accuracies": correct / pairs,
        "logps/chosen": logp_chosen / pairs, "logps/rejected": logp_rejected / pairs,
    }
    return StepOutcome(
        loss=step_loss, grad_norm=grad_norm, finite=finite, z_mean=0.0, tokens=tokens, trained=trained,
        by_source={src: [by_source[i], plan.source_pairs[i]] for i, src in enumerate(plan.sources)}, metrics=metrics,
    )


__all__ = [
    "CachedReference", "ModelReference", "PairPlan", "build_reference", "cache_reference", "check_stage_data", "dpo_step",
    "model_inputs", "plan_pairs",
]
