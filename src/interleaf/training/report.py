"""What a stage reports: a ``metrics.jsonl`` record every ``log_every`` steps (mirrored to the
trackers ``report_to`` names), the progress bar, the skipped steps, the error that ends a run of
them, and the summary at the end, also written into the final model's card (:mod:`interleaf.cards`).

Throughput: each record has ``tokens_per_s`` (positions the LM saw, every process, since the last
record) and, for a next-token stage, ``flops_per_s`` (model FLOPs, :mod:`interleaf.training.flops`)
and ``mfu`` (those over the peak of every process's device; only when the peak is known). The
summary has the same three over the whole run of this process (since its start or resume)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from . import checkpoint as ckpt
from .config import StageConfig
from .distributed import DistState, gather_objects
from .flops import FlopCount, device_peak_flops
from .logging import MetricsLogger, Throughput, write_summary
from .progress import Progress
from .step import StepOutcome


class StageReport:
    """The stage's log: per-source losses since the last record, the token rate, the logger."""

    def __init__(self, stage: StageConfig, logger: MetricsLogger, dist: DistState, flops: FlopCount | None = None):
        self.stage, self.logger, self.dist, self.flops = stage, logger, dist, flops
        logger.open_trackers(stage.report_to)  # only the main process's logger is enabled
        self.through = Throughput()
        # source -> [CE sum, tokens] since the last record; a sum may be a tensor on the device, read when the
        # record is written (once per log_every steps)
        self.window: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
        self.last_rate = 0.0
        peak = device_peak_flops(stage.peak_flops, dist.device, stage.precision)
        self.peak = peak * dist.world_size if peak is not None else None  # every process's devices together
        self.window_flops = self.window_tokens = 0.0  # since the last record
        self.run_flops = self.run_tokens = 0.0  # since this process started the stage (or resumed it)

    def _throughput(self, outcome: StepOutcome) -> None:
        step_flops = self.flops.step(outcome.tokens, outcome.squared_lengths) if self.flops is not None else 0.0
        self.window_flops += step_flops
        self.window_tokens += outcome.tokens
        self.run_flops += step_flops
        self.run_tokens += outcome.tokens

    def _rates(self, tokens_per_s: float, flops: float, tokens: float) -> dict[str, float]:
        """``flops_per_s`` and ``mfu`` at ``tokens_per_s`` for ``flops`` spent on ``tokens`` (none without a count)."""
        if self.flops is None:
            return {}
        rate = tokens_per_s * flops / tokens if tokens else 0.0
        return {"flops_per_s": rate, **({"mfu": rate / self.peak} if self.peak else {})}

    def after_step(self, lr: float, outcome: StepOutcome, progress: Progress) -> None:
        """Log the step just counted in ``progress`` (every process calls it: the record is gathered)."""
        stage, step = self.stage, progress.step
        if outcome.finite:
            for src, (c, n) in outcome.by_source.items():
                self.window[src][0] += c
                self.window[src][1] += n
        self.through.add(outcome.tokens)
        self._throughput(outcome)
        if step % stage.log_every == 0 or step == stage.max_steps:
            per_source = _reduce_window(self.window, self.dist)
            self.window.clear()
            rate = self.through.rate()
            record = {
                "step": step, "loss": progress.last_loss, "lr": lr, "tokens_per_s": rate, "grad_norm": outcome.grad_norm,
                "z_loss": outcome.z_mean, "tokens_seen": progress.tokens_seen, "samples_seen": progress.samples_seen,
                "elapsed_s": progress.elapsed(), **self._rates(rate, self.window_flops, self.window_tokens),
            }
            self.window_flops = self.window_tokens = 0.0
            record.update(outcome.metrics)  # the objective's own values (a DPO stage's rewards)
            if not outcome.finite:  # JSON has no NaN: the loss of a skipped step is null
                record.update(loss=None, grad_norm=None, z_loss=None, skipped=_nonfinite_what(outcome.loss, outcome.grad_norm))
                record.update({k: None for k in outcome.metrics})
            if per_source:
                record["loss_by_source"] = per_source
            self.logger.log(record)
            self.last_rate = rate
        self.logger.step({"loss": progress.last_loss, "tok/s": round(self.last_rate)})
        if not outcome.finite and self.dist.is_main:
            self.logger.write(
                f"step {step}: {_nonfinite_what(outcome.loss, outcome.grad_norm)}; the step was skipped "
                f"({progress.nonfinite_run} in a row, the limit is max_nonfinite_steps: {stage.max_nonfinite_steps})"
            )

    def finish(self, progress: Progress, *, stream, final: Path, n_trainable: int) -> dict:
        """The stage's summary (gathered from every process); the main process writes and prints it."""
        bad = _merge_bad(gather_objects(_bad_counts(stream), self.dist))
        last_loss = progress.last_loss
        run_s = max(progress.elapsed() - progress.elapsed_before, 1e-9)
        summary = {
            "stage": self.stage.name, "steps": progress.step, "time_s": round(progress.elapsed(), 3),
            "final_loss": last_loss if math.isfinite(last_loss) else None,  # None: every step was skipped
            "tokens_seen": progress.tokens_seen, "trained_tokens_seen": progress.trained_seen,
            "samples_seen": progress.samples_seen, "trainable_parameters": n_trainable, "processes": self.dist.world_size,
            "bad_samples": bad.get("bad", {}), "samples_read_by_source": bad.get("seen", {}), "final_model": str(final),
            "nonfinite_steps": len(progress.nonfinite_at), "nonfinite_at": progress.nonfinite_at[:100],
            "tokens_per_s": self.run_tokens / run_s, **self._rates(self.run_tokens / run_s, self.run_flops, self.run_tokens),
        }
        if self.dist.is_main:
            write_summary(self.stage.out, summary)
            _card(final, self.stage, summary)
            self.logger.write(_summary_text(summary))
        return summary


def _card(final: Path, stage: StageConfig, summary: dict) -> None:
    """The final model's card, with this stage's summary and settings (a README the user wrote is kept)."""
    from ..cards import hub_id, write_model_card

    config = {"model": stage.model.to_dict(), "data": stage.data, "objective": stage.objective,
              "freeze": stage.freeze, "batch_size": stage.batch_size}
    # the card save_final wrote carries the starting model's stages; this stage follows them
    write_model_card(final, base_model=hub_id(stage.model.path), training={**summary, "config": config}, carry_from=final)


def _bad_counts(stream) -> dict:
    bad = getattr(stream, "bad", None)
    return bad.to_dict() if bad is not None and hasattr(bad, "to_dict") else {}


def _merge_bad(dicts: list[dict]) -> dict:
    seen: dict[str, int] = defaultdict(int)
    bad: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for d in dicts:
        for s, n in d.get("seen", {}).items():
            seen[s] += n
        for s, reasons in d.get("bad", {}).items():
            for r, n in reasons.items():
                bad[s][r] += n
    return {"seen": dict(seen), "bad": {s: dict(r) for s, r in bad.items()}}


def _on_host(window: dict[str, list]) -> dict[str, list[float]]:
    """The window with its sums as floats: the sums a step left on the device are read in one transfer."""
    import torch

    on_device = [(src, i) for src, pair in window.items() for i, v in enumerate(pair) if torch.is_tensor(v)]
    host = {src: [v if not torch.is_tensor(v) else None for v in pair] for src, pair in window.items()}
    if on_device:
        values = torch.stack([window[src][i].to(torch.float64) for src, i in on_device]).tolist()
        for (src, i), v in zip(on_device, values):
            host[src][i] = v
    return host


def _reduce_window(window: dict[str, list], dist: DistState) -> dict[str, float]:
    merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for part in gather_objects(_on_host(window), dist):
        for src, (c, n) in part.items():
            merged[src][0] += c
            merged[src][1] += n
    return {src: c / n for src, (c, n) in sorted(merged.items()) if n}


def _summary_text(s: dict) -> str:
    lines = [
        f"stage {s['stage']!r} done: {s['steps']} steps in {s['time_s']:.1f} s, final loss "
        f"{'none (every step was skipped)' if s['final_loss'] is None else format(s['final_loss'], '.4f')}, "
        f"{s['tokens_seen']:,} tokens seen; model in {s['final_model']}",
    ]
    bad = s.get("bad_samples") or {}
    if bad:
        lines.append("bad samples skipped: " + "; ".join(f"{src}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()) for src, reasons in bad.items()))
    if s.get("nonfinite_steps"):
        at = s.get("nonfinite_at") or []
        more = ", ..." if s["nonfinite_steps"] > len(at) else ""
        lines.append(f"steps skipped for a non-finite loss or gradient: {s['nonfinite_steps']} (at step "
                     + ", ".join(str(n) for n in at) + more + ")")
    return "\n".join(lines)


def _nonfinite_what(loss: float, grad_norm: float) -> str:
    return f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"


def nonfinite_stop(stage: StageConfig, progress: Progress, outcome: StepOutcome) -> Exception:
    """The error that ends a run after ``max_nonfinite_steps`` skipped steps in a row."""
    from ..errors import TrainingError

    steps = progress.nonfinite_at[-progress.nonfinite_run:]
    latest = ckpt.list_checkpoints(Path(stage.out))
    resume = (f"the latest checkpoint is {latest[-1]}" if latest else "there is no checkpoint yet")
    return TrainingError(
        f"stage {stage.name!r}: {len(steps)} steps in a row had a non-finite loss or gradient (steps "
        f"{', '.join(str(n) for n in steps)}; the last: {_nonfinite_what(outcome.loss, outcome.grad_norm)}), the limit set by "
        f"max_nonfinite_steps: {stage.max_nonfinite_steps}; these steps did not change the weights. Lower optim.lr, "
        f"set optim.clip_grad_norm, use precision: fp32, or check the samples read at these steps; {resume}, "
        f"which `interleaf train CONFIG --resume` continues from (raise max_nonfinite_steps to tolerate more)"
    )


__all__ = ["StageReport", "nonfinite_stop"]
