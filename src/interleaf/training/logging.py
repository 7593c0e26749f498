"""Training progress and metrics: a tqdm bar, ``OUT/metrics.jsonl``, TensorBoard when installed,
and ``OUT/summary.json`` at the end. Only the main process writes."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes one JSON object per logged step; mirrors scalars to TensorBoard if it is importable."""

    def __init__(self, out: str | Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool = True):
        self.enabled = enabled
        self.out = Path(out)
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        try:  # TensorBoard is optional: skip silently when it is not installed
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        except Exception:
            self._tb = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def step(self, postfix: dict[str, float]) -> None:
        """Advance the progress bar by one optimiser step."""
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"train/{key}/{sub}", v, step)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


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


__all__ = ["MetricsLogger", "Throughput", "write_summary"]
