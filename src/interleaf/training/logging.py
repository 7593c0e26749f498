"""Training progress and metrics: ``OUT/metrics.jsonl``, the trackers ``report_to`` names
(TensorBoard in ``OUT/tensorboard``, Weights & Biases in ``OUT/wandb``), the progress display, and
``OUT/summary.json`` at the end. Only the main process writes, tracks and shows progress.

Weights & Biases runs offline: the run is written under ``OUT/wandb`` and nothing goes over the
network, unless the user sets ``WANDB_MODE=online`` (the run is then streamed to the W&B server)
or ``WANDB_MODE=disabled`` (nothing is written). An offline run is uploaded later, if ever, with
``wandb sync OUT/wandb/offline-run-*``. The run's config is the stage's (``OUT/config.yaml``), its
project ``WANDB_PROJECT`` (default ``interleaf``), its name the stage's; W&B's capture of the
console is off (the progress display stays as it is), its own settings otherwise apply.

Progress: on a terminal, a tqdm bar (``TQDM_DISABLE=1`` hides it); on anything else (a log file,
a pipe) a bar's every refresh would become a fragment of the log, so one plain line is written per
``metrics.jsonl`` record instead (``step 10/100: loss 2.3456, lr 0.0001, 1234 tok/s``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, TextIO

from ..terminal import is_terminal

class MetricsLogger:
    """Writes one JSON object per logged step; mirrors its scalars to the trackers opened by :meth:`open_trackers`.

    ``stream`` receives the progress display and messages (default: ``sys.stderr``).
    """

    def __init__(self, out: str | Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool = True,
                 stream: TextIO | None = None):
        self.enabled = enabled
        self.out = Path(out)
        self.total_steps = total_steps
        self.stream = stream
        self._file = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self._lines = False  # plain progress lines instead of a bar
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        if progress and is_terminal(self._out()):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=self._out()
            )
        else:
            self._lines = progress

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def open_trackers(self, report_to: list[str] | tuple[str, ...], config: dict[str, Any] | None = None) -> None:
        """Start the trackers named in a stage's ``report_to`` (main process only; none by default).

        ``config`` is the run's config for trackers that keep one (W&B); by default the stage's
        ``OUT/config.yaml``, which the training loop writes before the logger starts.
        """
        if not self.enabled or not report_to:
            return
        for name in report_to:  # every tracker importable before any starts
            _import_tracker(name)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        if "wandb" in report_to:
            try:
                self._wandb = _wandb_run(self.out, self._config() if config is None else config)
            except BaseException:
                self.close()  # the TensorBoard writer and metrics.jsonl with it: the stage does not start
                raise

    def _config(self) -> dict[str, Any]:
        path = self.out / "config.yaml"
        if not path.is_file():
            return {}
        from ..files import read_yaml

        return read_yaml(path, "the stage's saved config") or {}

    def step(self, postfix: dict[str, float]) -> None:
        """Advance the progress bar by one optimiser step."""
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl``; its numbers go to the trackers as ``train/KEY`` (nested: ``train/KEY/SUB``)."""
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for tag, value in scalars(record).items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars(record), step=int(record["step"]))
        if self._lines:
            print(_line(record, self.total_steps), file=self._out(), flush=True)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._out())
        else:
            print(text, file=self._out(), flush=True)

    def close(self) -> None:
        """Close the file and the trackers. Called while an exception propagates (a ``finally``
        block of a failed stage), the W&B run is finished as failed (exit code 1)."""
        failed = sys.exc_info()[0] is not None
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish(exit_code=1 if failed else 0)


_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _import_tracker(name: str) -> None:
    """Import a tracker's package; a missing one is a :class:`ConfigError` with the install hint."""
    try:
        if name == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        elif name == "wandb":
            import wandb  # noqa: F401
    except ImportError as e:
        from ..errors import ConfigError

        raise ConfigError(
            "report_to", f"names {name}, which cannot be imported: {e}",
            f"pip install 'interleaf[ecosystem]' (or {_TRACKER_PACKAGES[name]} alone), or remove {name} from report_to",
        ) from e


def wandb_mode() -> str:
    """The mode interleaf's W&B runs use: ``offline`` unless ``WANDB_MODE`` is ``online`` or ``disabled``."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode if mode in ("online", "disabled") else "offline"


def _wandb_run(out: Path, config: dict[str, Any]) -> Any:
    """A W&B run under ``out/wandb``, offline unless the user chose otherwise (:func:`wandb_mode`);
    a run of the user's own in the same process is left running (``reinit="create_new"``)."""
    import wandb

    mode = wandb_mode()
    try:
        return wandb.init(
            dir=str(out), mode=mode, project=os.environ.get("WANDB_PROJECT") or "interleaf",
            name=config.get("name"), config=config, settings=wandb.Settings(console="off"), reinit="create_new",
        )
    except wandb.errors.Error as e:  # above all an online run without credentials
        from ..errors import ConfigError

        raise ConfigError(
            "report_to", f"names wandb, whose {mode} run under {str(out / 'wandb')!r} could not start: {e}",
            "for an online run (WANDB_MODE=online) log in first (wandb login, or WANDB_API_KEY); "
            "unset WANDB_MODE for an offline run, or remove wandb from report_to",
        ) from e


@contextlib.contextmanager
def library_bars_off_unless_terminal(stream: Any = None) -> Iterator[None]:
    """Within the block, transformers' own progress bars (writing shards) stay off when ``stream``
    (default: ``sys.stderr``) is not a terminal; the previous setting is restored after it."""
    from transformers.utils import logging as hf_logging

    if is_terminal(stream if stream is not None else sys.stderr) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracker scalars of a ``metrics.jsonl`` record: every finite number but ``step``, by tag."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"train/{key}/{sub}": float(v) for sub, v in value.items() if _number(v)})
        elif _number(value):
            out[f"train/{key}"] = float(value)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _line(record: dict[str, Any], total: int) -> str:
    loss = record.get("loss")
    parts = ["loss " + ("skipped" if loss is None else f"{loss:.4f}")]
    if _number(record.get("lr")):
        parts.append(f"lr {record['lr']:.4g}")
    if _number(record.get("tokens_per_s")):
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    return f"step {record['step']}/{total}: " + ", ".join(parts)


def _short(v: float) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(out: str | Path, summary: dict) -> Path:
    path = Path(out) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


class Throughput:
    """Tokens per second since the last call."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        r = self.tokens / dt
        self.t0, self.tokens = now, 0
        return r


__all__ = [
    "MetricsLogger", "Throughput", "is_terminal", "library_bars_off_unless_terminal", "scalars", "wandb_mode",
    "write_summary",
]
