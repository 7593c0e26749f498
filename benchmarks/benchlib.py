"""What every benchmark script shares: timing, peak memory, the dated header and the tables.

Each script prints a header (date, machine, load average, commit, the exact command), then
markdown tables of ``interleaf`` against a reference with the ratio and, where one is set, the
target and by how much it is met or missed. ``--results DIR`` appends the same text to
``DIR/<machine>-<date>.md`` (one file per machine and date).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@contextlib.contextmanager
def quiet():
    """No progress bars or loading reports from transformers in the printed tables (restored after)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def timed(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Median wall time of ``repeats`` calls, after one uncounted call when ``warm_up``."""
    if warm_up:
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object]) -> float:
    """MiB above the resident memory at the fork, in a forked child that runs ``fn`` once.

    ``ru_maxrss`` of the child minus its resident memory at the fork, so each model's peak is
    measured on its own within one parent process (tracemalloc does not see torch's tensors).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without cleanup
        os.close(read)
        base = rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        os.write(write, str(max(0, peak - base)).encode())
        os._exit(0)
    os.close(write)
    data = os.read(read, 64)
    os.waitpid(pid, 0)
    return int(data or 0) / 2**20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug() -> str:
    """The results file's machine name: ``gpu-<name>`` with a GPU, else ``cpu<cores>-<arch>``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def header(title: str, threads: int, argv: list[str] | None, script: str) -> list[str]:
    """The dated lines above a table: machine, load, versions, commit and the exact command."""
    import transformers

    now = _dt.datetime.now(_dt.timezone.utc)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    args = sys.argv[1:] if argv is None else argv
    return [
        f"## {title}",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_slug()}: {cpu_name()}, {os.cpu_count()} CPU cores, {device}; "
        f"load average (1, 5, 15 min) at the start: {load}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, {threads} thread(s)",
        f"- commit: {commit()}",
        f"- command: `{shlex.join(['python', f'benchmarks/{script}', *args])}`",
        "",
    ]


@dataclass
class Row:
    """One measured case. ``higher_is_better``: rates; else times and memory (the ratio is
    reference / interleaf either way, so > 1 means interleaf is ahead). ``target``: the ratio aimed at."""

    case: str
    reference: float
    ours: float
    unit: str
    higher_is_better: bool = False
    target: float | None = None

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.reference if self.reference else float("inf")
        return self.reference / self.ours if self.ours else float("inf")

    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.ratio >= self.target:
            return f">= {self.target:.2f}x: met"
        return f">= {self.target:.2f}x: missed by {100 * (1 - self.ratio / self.target):.0f} %"


def table(rows: list[Row], reference: str, ours: str = "interleaf") -> list[str]:
    lines = [f"| case | {reference} | {ours} | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        fmt = "{:.3f}" if row.unit == "s" else "{:.1f}"
        lines.append(f"| {row.case} ({row.unit}) | {fmt.format(row.reference)} | {fmt.format(row.ours)} "
                     f"| {row.ratio:.2f}x | {row.verdict()} |")
    return lines


def emit(lines: list[str], results: Path | None) -> str:
    """Print the text; with ``results`` (a folder) also append it to ``<machine>-<date>.md`` there."""
    text = "\n".join(lines) + "\n"
    print(text)
    sys.stdout.flush()
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        path = results / f"{machine_slug()}-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}.md"
        with path.open("a") as f:
            f.write(text + "\n")
        print(f"(appended to {path})")
    return text


def size_arguments(parser, sizes) -> None:
    """The options the CPU comparison scripts share: the size, threads, repeats, new tokens, where the
    results go, and ``--smoke`` (the smoke size, one repeat: what the tests run)."""
    parser.add_argument("--size", choices=list(sizes), default="tiny")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: the size's (smoke 4, tiny 64, mid 32)")
    parser.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None,
                        help="append the tables to DIR/<machine>-<date>.md (default DIR: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="the smoke size, one repeat: seconds (the tests run this)")


def parse_size_arguments(parser, argv):
    """``parser.parse_args(argv)`` with ``--smoke`` applied."""
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.repeats = "smoke", 1
    return args
