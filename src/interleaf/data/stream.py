"""Streaming a mixture: deterministic, resumable, sharded across ranks, robust to bad samples.

::

    sources ──► per-source stream (this rank's share, re-shuffled each pass) ──► parse ──► encode
        pairs / interleaved, and every source of parquet / Arrow files (interleaf.data.tables):
                             shards in a seeded order, read lazily; blocks of ``shuffle_buffer``
                             samples are shuffled; rank r keeps samples whose running index i
                             has i % world_size == r (bytes of the others are never read)
        llava, preference:   the JSON is loaded once; a seeded permutation per pass; rank r takes
                             every world_size-th entry
    schedule per epoch ──► which source gives the next sample: counts shuffled, or drawn by weight
    ──► {"input_ids", "labels", "images", "source", "loss_weight", "key"}  (collate() batches them)
        preference: {"chosen": {...}, "rejected": {...}, "source", "loss_weight", "key", "pair"}
                    (collate_preference() batches them; see interleaf.data.preference)

Everything is a pure function of (seed, epoch, rank, world_size), so :meth:`MixtureStream.state_dict`
is a few integers per source: a resumed stream re-reads at most one shuffle block and then
yields exactly what an uninterrupted one would. Bad samples are skipped and counted in a
:class:`BadSampleCounter`; past ``max_bad_fraction`` of a source's samples the stream raises
:class:`~interleaf.errors.InputError` naming the source, the share and the reasons.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import InputError
from .formats import (
    BadSample,
    LlavaRecord,
    TarSample,
    load_llava,
    parse_conversation,
    parse_document,
    parse_pair,
)
from .mixture import MixtureConfig, SourceConfig, load_mixture
from .preference import Preference, encode_preference, parse_preference
from .tables import TableRow, count_samples, is_table_file, iter_samples, parse_row
from .tokenize import encode_sample

MIN_SEEN_FOR_BAD_CHECK = 20


def _share(total: int, rank: int, world_size: int) -> int:
    """How many of ``total`` items rank ``rank`` gets when dealt round-robin."""
    return total // world_size + (1 if rank < total % world_size else 0)


# --------------------------------------------------------------------------- bad samples


class BadSampleCounter:
    """Counts skipped samples by (source, reason) and every sample seen per source."""

    def __init__(self, max_bad_fraction: float = 0.1, min_seen: int = MIN_SEEN_FOR_BAD_CHECK):
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.counts: Counter[tuple[str, str]] = Counter()
        self.seen: Counter[str] = Counter()
        self.examples: dict[tuple[str, str], list[str]] = defaultdict(list)  # a few "where: detail"

    def add_good(self, source: str) -> None:
        self.seen[source] += 1

    def add_bad(self, source: str, bad: BadSample) -> None:
        self.seen[source] += 1
        self.counts[(source, bad.reason)] += 1
        if len(self.examples[(source, bad.reason)]) < 3:
            self.examples[(source, bad.reason)].append(f"{bad.where}: {bad.detail}")

    def bad(self, source: str) -> int:
        return sum(n for (s, _), n in self.counts.items() if s == source)

    def check(self, source: str) -> None:
        """Raise :class:`InputError` when ``source`` has more bad samples than allowed."""
        seen, bad = self.seen[source], self.bad(source)
        if seen < self.min_seen or bad <= self.max_bad_fraction * seen:
            return
        reasons = ", ".join(f"{r} {n}" for (s, r), n in sorted(self.counts.items()) if s == source)
        example = next(e[0] for (s, _), e in sorted(self.examples.items()) if s == source and e)
        raise InputError(
            f"source {source!r}: {bad} of {seen} samples ({bad / seen:.0%}) are bad, more than "
            f"max_bad_fraction={self.max_bad_fraction:g}; reasons: {reasons}; e.g. {example}. Fix or remove "
            "the broken files (run `interleaf data inspect` on them), or raise max_bad_fraction in the mixture"
        )

    def summary(self) -> str:
        """A printable table: source, reason, count, share of the source's samples."""
        if not self.seen:
            return "no samples seen"
        rows = [("source", "reason", "count", "share")]
        for source in sorted(self.seen):
            seen = self.seen[source]
            reasons = sorted((r, n) for (s, r), n in self.counts.items() if s == source)
            if not reasons:
                rows.append((source, "(none)", "0", f"0 of {seen}"))
            for reason, n in reasons:
                rows.append((source, reason, str(n), f"{n / seen:.1%} of {seen}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """``{"seen": {source: n}, "bad": {source: {reason: n}}}``."""
        bad: dict[str, dict[str, int]] = defaultdict(dict)
        for (source, reason), n in sorted(self.counts.items()):
            bad[source][reason] = n
        return {"seen": dict(sorted(self.seen.items())), "bad": dict(bad)}

    def load_dict(self, data: dict) -> None:
        self.seen = Counter(data.get("seen", {}))
        self.counts = Counter({(s, r): n for s, reasons in data.get("bad", {}).items() for r, n in reasons.items()})


# --------------------------------------------------------------------------- per-source streams


class _SourceStream:
    """This rank's share of one source as an endless sequence of passes, each re-shuffled."""

    def __init__(self, cfg: SourceConfig, seed: int, rank: int, world_size: int):
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.epoch = 0  # passes over the source completed
        self.good_in_epoch = 0  # usable samples in the current pass (a pass with none is an error)
        self.last_bad: BadSample | None = None  # the latest skipped sample, named when a pass has none usable

    def _rng(self, *parts: Any) -> random.Random:
        return random.Random(":".join(str(p) for p in (self.seed, self.cfg.name, *parts)))

    def _end_pass(self, raw_in_pass: int) -> None:
        if raw_in_pass == 0:
            raise InputError(
                f"source {self.cfg.name!r}: rank {self.rank} of {self.world_size} got no samples in a full pass; "
                "the files are empty, or there are fewer samples than ranks"
            )
        if self.good_in_epoch == 0:
            last = self.last_bad
            why = f" (the last: {last.where}: {last.reason}: {last.detail})" if last is not None else ""
            raise InputError(
                f"source {self.cfg.name!r}: not one usable sample in a full pass over {raw_in_pass} samples{why}; "
                "run `interleaf data inspect` on its files to see why"
            )
        self.epoch += 1
        self.good_in_epoch = 0

    def parse(self, raw: Any):
        raise NotImplementedError

    def next_raw(self) -> Any:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


_FILE_KIND = {"llava": "LLaVA"}  # how errors name a source's file


class _LlavaStream(_SourceStream):
    def __init__(self, cfg: SourceConfig, seed: int, rank: int, world_size: int):
        super().__init__(cfg, seed, rank, world_size)
        self.records: list[tuple[LlavaRecord, Path]] = []
        for path in cfg.files():
            root = Path(cfg.images_root) if cfg.images_root else Path(path).parent
            self.records += [(r, root) for r in load_llava(path, _FILE_KIND.get(cfg.format, cfg.format))]
        self.pos = 0
        self._order: list[int] | None = None

    def size(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> list[int]:
        perm = list(range(len(self.records)))
        self._rng("pass", epoch).shuffle(perm)
        return perm[self.rank :: self.world_size]

    def next_raw(self):
        if self._order is None:
            self._order = self.order(self.epoch)
        while self.pos >= len(self._order):
            self._end_pass(len(self._order))
            self._order, self.pos = self.order(self.epoch), 0
        raw = self.records[self._order[self.pos]]
        self.pos += 1
        return raw

    def parse(self, raw):
        record, root = raw
        return parse_conversation(
            record, images_root=root, image_path_map=self.cfg.image_path_map, task_prompt=self.cfg.task_prompt
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "good_in_epoch": self.good_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.good_in_epoch = state["epoch"], state["pos"], state["good_in_epoch"]
        self._order = None


class _ShardStream(_SourceStream):
    """Tar shards in a seeded order per pass, shuffled in blocks of ``buffer`` samples.

    A block's start is a position ``(shard, sample in shard, running index)``; the state is that
    start plus the offset in the (re-buildable) block.
    """

    def __init__(self, cfg: SourceConfig, seed: int, rank: int, world_size: int, buffer: int):
        super().__init__(cfg, seed, rank, world_size)
        self.files = cfg.files()
        self.buffer = buffer
        self.block_index = 0
        self.start = (0, 0, 0)
        self.offset = 0
        self.raw_in_pass = 0
        self._block: list | None = None
        self._next_start = (0, 0, 0)
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            self._size = sum(count_samples(f) for f in self.files)
        return self._size

    def order(self, epoch: int) -> list[str]:
        files = list(self.files)
        self._rng("shards", epoch).shuffle(files)
        return files

    def _fill(self) -> None:
        """Read the block that starts at ``self.start`` and shuffle it."""
        order = self.order(self.epoch)
        shard, skip, index = self.start
        items: list = []
        while shard < len(order) and len(items) < self.buffer:
            first = index - skip  # running index of the shard's sample 0

            def mine(i: int, skip=skip, first=first) -> bool:
                return i >= skip and (first + i) % self.world_size == self.rank

            done = False
            j = -1
            with contextlib.closing(iter_samples(order[shard], select=mine)) as samples:
                for item in samples:
                    if isinstance(item, BadSample):  # the rest of the shard is unreadable: one bad sample
                        if shard % self.world_size == self.rank:
                            items.append(item)
                        break
                    j += 1
                    if j < skip:
                        continue
                    if item is not None:
                        items.append(item)
                    if len(items) >= self.buffer:
                        done = True
                        break
            index = first + j + 1
            if done:
                skip = j + 1
                break
            shard, skip = shard + 1, 0
        self._rng("block", self.epoch, self.block_index).shuffle(items)
        self._block, self._next_start = items, (shard, skip, index)

    def next_raw(self):
        while True:
            if self._block is None:
                self._fill()
            if self.offset < len(self._block):
                item = self._block[self.offset]
                self.offset += 1
                self.raw_in_pass += 1
                return item
            if not self._block:  # the pass is over
                self._end_pass(self.raw_in_pass)
                self.raw_in_pass, self.block_index, self.start = 0, 0, (0, 0, 0)
            else:
                self.block_index, self.start = self.block_index + 1, self._next_start
            self.offset, self._block = 0, None

    def parse(self, raw):
        if isinstance(raw, BadSample):
            raise raw
        if isinstance(raw, TableRow):
            return parse_row(raw, self.cfg)
        assert isinstance(raw, TarSample)
        return parse_pair(raw) if self.cfg.format == "pairs" else parse_document(raw)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "block": self.block_index, "start": list(self.start), "offset": self.offset,
            "raw_in_pass": self.raw_in_pass, "good_in_epoch": self.good_in_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.block_index, self.offset = state["epoch"], state["block"], state["offset"]
        self.start = tuple(state["start"])
        self.raw_in_pass, self.good_in_epoch = state["raw_in_pass"], state["good_in_epoch"]
        self._block = None


class _PreferenceStream(_LlavaStream):
    """Preference files are read and dealt out as LLaVA files are; each entry is a :class:`Preference`."""

    def parse(self, raw):
        record, root = raw
        return parse_preference(
            record, images_root=root, image_path_map=self.cfg.image_path_map, task_prompt=self.cfg.task_prompt
        )


def _encode(parsed, processor, **settings) -> dict:
    """A parsed sample -> its training sample: a preference pair's two rows, or one row."""
    if isinstance(parsed, Preference):
        return encode_preference(parsed, processor, **settings)
    return encode_sample(parsed, processor, **settings)


def _source_stream(cfg: SourceConfig, seed: int, rank: int, world_size: int, buffer: int) -> _SourceStream:
    """Tar shards and parquet / Arrow files stream in blocks; JSON files are loaded once."""
    if cfg.format in ("pairs", "interleaved") or all(is_table_file(p) for p in cfg.paths):
        return _ShardStream(cfg, seed, rank, world_size, buffer)
    kind = _PreferenceStream if cfg.format == "preference" else _LlavaStream
    return kind(cfg, seed, rank, world_size)


# --------------------------------------------------------------------------- the mixture


class MixtureStream(IterableDataset):
    """An endless (or ``epochs``-long) iterator of tokenised samples from a mixture.

    ``seed`` defaults to the mixture's; ``rank`` / ``world_size`` give each training process a
    disjoint share. ``epoch`` and ``samples_seen`` say where the stream is; ``state_dict()`` /
    ``load_state_dict()`` save and restore the exact position. Use it with
    ``DataLoader(stream, batch_size=B, collate_fn=...)`` and ``num_workers=0`` (the stream is
    one ordered sequence).
    """

    def __init__(
        self,
        mixture: MixtureConfig | dict | str | Path,
        processor,
        *,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
    ):
        self.mixture = load_mixture(mixture)
        self.processor = processor
        self.seed = self.mixture.seed if seed is None else seed
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"MixtureStream: rank={rank} must be in [0, world_size={world_size})")
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.max_length = self.mixture.max_length or getattr(processor, "max_length", None)
        self.sources = [
            _source_stream(s, self.seed, rank, world_size, self.mixture.shuffle_buffer) for s in self.mixture.sources
        ]
        self.bad = BadSampleCounter(self.mixture.max_bad_fraction)
        self.epoch = 0
        self.position = 0  # samples yielded in this epoch
        self.samples_seen = 0  # samples yielded in all
        self._schedule: list[int] | None = None

    # -- the schedule --
    def epoch_length(self) -> int:
        """Samples this rank yields per epoch."""
        m = self.mixture
        if m.uses_counts:
            return sum(_share(s.samples, self.rank, self.world_size) for s in m.sources)
        total = m.samples_per_epoch or sum(s.size() for s in self.sources)
        return _share(total, self.rank, self.world_size)

    def schedule(self, epoch: int) -> list[int]:
        """The source index of every sample of ``epoch`` on this rank."""
        m = self.mixture
        rng = random.Random(f"{self.seed}:mixture:{epoch}")
        if m.uses_counts:
            order = [i for i, s in enumerate(m.sources) for _ in range(_share(s.samples, self.rank, self.world_size))]
            rng.shuffle(order)
            return order
        weights = [s.weight for s in m.sources]
        return rng.choices(range(len(m.sources)), weights=weights, k=self.epoch_length())

    # -- iteration --
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise InputError(
                f"MixtureStream is one ordered sequence; DataLoader(num_workers={info.num_workers}) would copy it "
                "into every worker and repeat samples. Use num_workers=0 or 1 (ranks already split the data)"
            )
        return self

    def __next__(self) -> dict:
        if self._schedule is None:
            self._schedule = self.schedule(self.epoch)
        while self.position >= len(self._schedule):
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
            self._schedule = self.schedule(self.epoch)
        sample = self._next_from(self._schedule[self.position])
        self.position += 1
        self.samples_seen += 1
        return sample

    def take(self, n: int) -> list[dict]:
        """The next ``n`` samples (fewer if a finite stream ends)."""
        out = []
        for _ in range(n):
            try:
                out.append(next(self))
            except StopIteration:
                break
        return out

    def _next_from(self, i: int) -> dict:
        stream, cfg = self.sources[i], self.mixture.sources[i]
        while True:
            raw = stream.next_raw()
            try:
                sample = _encode(
                    stream.parse(raw), self.processor, source=cfg.name, max_length=self.max_length,
                    max_images=cfg.max_images, task_prompt=cfg.task_prompt if cfg.format == "pairs" else None,
                    loss_weight=cfg.loss_weight,
                )
            except BadSample as bad:
                self.bad.add_bad(cfg.name, bad)
                self.bad.check(cfg.name)
                stream.last_bad = bad
                continue
            self.bad.add_good(cfg.name)
            stream.good_in_epoch += 1
            return sample

    # -- resuming --
    def state_dict(self) -> dict:
        """The exact position (JSON-serialisable)."""
        return {
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "epoch": self.epoch, "position": self.position, "samples_seen": self.samples_seen,
            "sources": {cfg.name: s.state_dict() for cfg, s in zip(self.mixture.sources, self.sources)},
            "bad_samples": self.bad.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if state.get(key) != getattr(self, key):
                raise InputError(
                    f"MixtureStream.load_state_dict: the state was saved with {key}={state.get(key)!r} but this "
                    f"stream has {key}={getattr(self, key)!r}; resume with the same {key} to get the same samples"
                )
        names = [s.name for s in self.mixture.sources]
        if sorted(state.get("sources", {})) != sorted(names):
            raise InputError(
                f"MixtureStream.load_state_dict: the state's sources {sorted(state.get('sources', {}))} differ from "
                f"the mixture's {sorted(names)}; a resumed run needs the same mixture"
            )
        self.epoch, self.position, self.samples_seen = state["epoch"], state["position"], state["samples_seen"]
        for name, stream in zip(names, self.sources):
            stream.load_state_dict(state["sources"][name])
        self.bad.load_dict(state.get("bad_samples", {}))
        self._schedule = None


def iter_source(
    cfg: SourceConfig, processor, *, max_length: int | None = None
) -> Iterator[tuple[dict | None, BadSample | None]]:
    """One source's samples in file order, unshuffled: ``(sample, None)`` or ``(None, bad)``."""
    stream = _source_stream(cfg, 0, 0, 1, 1)
    if isinstance(stream, _LlavaStream):
        raws: Iterator = iter(stream.records)
    else:
        raws = (item for f in stream.files for item in iter_samples(f))
    for raw in raws:
        try:
            yield _encode(
                stream.parse(raw), processor, source=cfg.name, max_length=max_length, max_images=cfg.max_images,
                task_prompt=cfg.task_prompt if cfg.format == "pairs" else None, loss_weight=cfg.loss_weight,
            ), None
        except BadSample as bad:
            yield None, bad


__all__ = ["BadSampleCounter", "MixtureStream", "iter_source"]
