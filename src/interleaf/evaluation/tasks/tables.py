"""Evaluation sets from their parquet (or Arrow) files, as the hub ships them, read with pyarrow.

A task's ``files`` entry that ends in ``.parquet`` or ``.arrow`` may be a glob relative to the data
folder (MMMU keeps one folder per subject: ``"*/validation-*.parquet"``); its files are read in
sorted order, every row a dict of Python values. An image column is ``datasets``' Image feature,
``{bytes, path}``, which the adapters take as they take it from JSON (the bytes, else the path)::

    rows = table_rows(ctx, "validation")   # the MMMU adapter does this for a parquet entry
"""

from __future__ import annotations

import glob
from pathlib import Path

from ...errors import InputError

TABLE_EXTENSIONS = (".parquet", ".arrow")


def is_table_entry(ctx, key: str) -> bool:
    """Whether the task's ``files[key]`` names parquet / Arrow files."""
    return str(ctx.task.files.get(key, "")).endswith(TABLE_EXTENSIONS)


def _read(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_file(source).read_all().to_pylist()
        except pa.ArrowInvalid:  # the stream format (datasets' save_to_disk)
            source.seek(0)
            return pa.ipc.open_stream(source).read_all().to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable {path.suffix[1:]} file ({e}); download it again") from e


def table_rows(ctx, key: str) -> list[dict]:
    """Every row of the files ``files[key]`` names (a path or a glob), file after file; each file
    read is recorded in ``ctx.read`` (``key``, then ``key[1]``, ``key[2]``, ...)."""
    rel = str(ctx.task.files[key])
    pattern = Path(rel).expanduser()
    pattern = pattern if pattern.is_absolute() else ctx.data_dir / pattern
    paths = sorted(Path(p) for p in glob.glob(str(pattern))) if glob.has_magic(rel) else [pattern]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        where = f" ({ctx.task.source})" if ctx.task.source else ""
        raise InputError(
            f"task {ctx.task.name!r}: {rel!r} ({key}) matches no file under {ctx.data_dir}; put the public "
            f"dataset's parquet files there{where}, or pass --data DIR pointing to the folder that holds them"
        )
    rows: list[dict] = []
    for i, path in enumerate(paths):
        ctx.read[key if i == 0 else f"{key}[{i}]"] = path
        rows += _read(path)
    return rows


__all__ = ["TABLE_EXTENSIONS", "is_table_entry", "table_rows"]
