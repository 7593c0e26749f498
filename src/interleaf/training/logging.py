"""Training progress and metrics: ``OUT/metrics.jsonl``, the trackers ``report_to`` names
(TensorBoard in ``OUT/tensorboard``), the progress display, and ``OUT/summary.json`` at the end.
Only the main process writes, tracks and shows progress.

Progress: on a terminal, a tqdm bar (``TQDM_DISABLE=1`` hides it); on anything else (a log file,
a pipe) a bar's every refresh would become a fragment of the log, so one plain line is written per
``metrics.jsonl`` record instead (``step 10/100: loss 2.3456, lr 0.0001, 1234 tok/s``).
"""

from __future__ import annotations

import contextlib
import json
import math
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

    def open_trackers(self, report_to: list[str] | tuple[str, ...]) -> None:
        """Start the trackers named in a stage's ``report_to`` (main process only; none by default)."""
        if not self.enabled or "tensorboard" not in report_to:
            return
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from ..errors import ConfigError

            raise ConfigError(
                "report_to", f"names tensorboard, which cannot be imported: {e}",
                "pip install 'interleaf[ecosystem]' (or tensorboard alone), or remove tensorboard from report_to",
            ) from e
        self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))

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
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


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


__all__ = ["MetricsLogger", "Throughput", "is_terminal", "library_bars_off_unless_terminal", "scalars", "write_summary"]
