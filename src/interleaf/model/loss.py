"""The causal-LM loss: logits at position t predict the label at t + 1; labels of ``IGNORE_INDEX`` are not trained.

One rule (the shift and the mask) with two reductions, because the two callers normalise differently:

- :func:`causal_lm_loss` (the model's ``forward(labels=...)``): the mean cross-entropy over this
  batch's trained tokens, plus ``z_loss`` times the mean squared log-partition ``Z = logsumexp(logits)``.
- :func:`weighted_token_loss` (the trainer): per-row sums, so the trainer can weight rows and divide
  by the token count of the whole global batch (every micro-batch of every process) — see
  :mod:`interleaf.training.loop` for the formula.

With every weight 1 and one batch, ``weighted_token_loss``'s sums divided by the trained-token count
give ``causal_lm_loss`` (up to float rounding: the two reduce in a different order).

Preference training (DPO) uses the same shift and mask: :func:`sequence_logps` is each row's
log-probability of its trained tokens, summed, and :func:`dpo_loss` the sigmoid DPO loss on them.

The log-partition never costs a second pass over the vocabulary: the cross-entropy of a token is
``CE = Z - logit[label]``, so ``Z = CE + logit[label]`` (:func:`log_partition`) is one lookup on top of
the cross-entropy already computed, with the same gradient (``softmax - onehot + onehot``). No
``(B, T, V)`` tensor is added to what autograd keeps (``torch.logsumexp`` would keep the logits for
its backward pass), and without z-loss no gradient flows through ``Z``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..processing.prompt_format import IGNORE_INDEX


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` (B, T, V) and ``labels`` (B, T) -> float32 logits (B, T-1, V) and their targets (B, T-1)."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    return shift_logits, shift_labels


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Trained positions per row after the shift, (B,)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def log_partition(shift_logits: torch.Tensor, shift_labels: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """``Z = logsumexp(shift_logits)`` at each position from its cross-entropy ``ce`` (same shape as
    ``shift_labels``): ``Z = ce + logit[label]``. Positions whose label is ``IGNORE_INDEX`` give 0."""
    mask = shift_labels != IGNORE_INDEX
    # indexing keeps only the indices for the backward pass (``gather`` would keep the logits)
    rows = torch.meshgrid(*(torch.arange(n, device=shift_labels.device) for n in shift_labels.shape), indexing="ij")
    picked = shift_logits[(*rows, shift_labels.masked_fill(~mask, 0))]
    return (ce + picked) * mask


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean next-token cross-entropy over labels != -100, plus ``z_loss * logsumexp(logits)^2``.

    Returns ``(loss, z)``: ``z`` is the mean of ``Z^2`` over trained tokens, ``None`` when
    ``z_loss`` is 0. A batch with no trained token gives a zero loss that keeps the graph.
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    mask = shift_labels != IGNORE_INDEX
    if not bool(mask.any()):
        zero = shift_logits.sum() * 0.0
        return zero, (zero if z_loss else None)
    flat_logits = shift_logits[mask]  # (K, V)
    flat_labels = shift_labels[mask]  # (K,)
    if not z_loss:
        return F.cross_entropy(flat_logits, flat_labels), None
    ce = F.cross_entropy(flat_logits, flat_labels, reduction="none")  # (K,)
    z = log_partition(flat_logits, flat_labels, ce).pow(2).mean()
    return ce.mean() + z_loss * z, z


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, z_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums over trained positions: ``(w * sum CE, w * sum Z^2, sum CE, count)``; each (B,).

    ``logits`` (B, T, V) predict ``labels`` shifted by one; ``weights`` (B,). ``z_grad=False`` (no
    z-loss) gives the ``Z^2`` sums detached: reported, never differentiated.
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    mask = (shift_labels != IGNORE_INDEX).float()  # (B, T-1)
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(mask)  # (B, T-1)
    z = log_partition(shift_logits if z_grad else shift_logits.detach(), shift_labels,
                      ce if z_grad else ce.detach()).pow(2)  # (B, T-1), 0 where masked
    ce_rows = ce.sum(-1)  # (B,)
    w = weights.to(ce_rows.device, ce_rows.dtype)
    return w * ce_rows, w * z.sum(-1), ce_rows, mask.sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its trained tokens: ``(logps (B,), token counts (B,))``.

    ``logps[b] = sum_t log softmax(logits[b, t])[labels[b, t + 1]]`` over positions whose label is
    not ``IGNORE_INDEX``, in float32 (the negated cross-entropy, which never builds the (B, T, V)
    log-softmax).
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    mask = shift_labels != IGNORE_INDEX  # (B, T-1)
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)  # (B, T-1), 0 where masked
    return -ce.sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss per pair, with the implicit rewards: ``(losses, chosen_rewards, rejected_rewards)``, each (B,).

    With the sequence log-probabilities of the policy (``pi``) and the frozen reference (``ref``)::

        h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        reward_chosen = beta * (pi_chosen - ref_chosen), reward_rejected = beta * (pi_rejected - ref_rejected)

    ``eps = label_smoothing`` is the conservative DPO variant (the preference labels are taken to
    be flipped with probability eps); 0 gives the original DPO loss. The rewards are detached.
    """
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


__all__ = [
    "IGNORE_INDEX", "causal_lm_loss", "dpo_loss", "log_partition", "sequence_logps", "shift_for_next_token",
    "trained_tokens", "weighted_token_loss",
]
