"""Reading an offline W&B run back: the records of its ``run-ID.wandb`` file.

wandb 0.31 ships no Python reader of its own run files, so this reads the format directly: a
7-byte file header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log style blocks of 32 KiB,
each record split into chunks with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle,
4 last); a block's tail shorter than a chunk header is padding. Each record is a protobuf
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_CHUNK_HEADER = 7


def _record_bytes(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"not a W&B run file: {path}"
    pos, parts = 7, []
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # padding at a block's end
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        if kind == 0:  # zero padding (a file cut at a block's end)
            pos += left
            continue
        body = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        assert len(body) == length, f"{path}: a record is cut short at byte {pos}"
        pos += _CHUNK_HEADER + length
        if kind == 1:
            yield body
        elif kind == 2:
            parts = [body]
        elif kind == 3:
            parts.append(body)
        elif kind == 4:
            yield b"".join(parts + [body])
            parts = []
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind} at byte {pos}")


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"config": {...}, "history": [{key: value}, ...], "exit_code": int | None}`` of the one
    offline run under ``run_dir`` (a ``wandb`` folder). W&B's own keys (``_wandb``, ``_runtime``,
    ``_timestamp``) are dropped; ``_step`` is kept."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run under {run_dir}, found {files}"
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    exit_code = None
    for raw in _record_bytes(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in update if item.key != "_wandb"})
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            history.append({k: v for k, v in row.items() if k == "_step" or not k.startswith("_")})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"config": config, "history": history, "exit_code": exit_code}
