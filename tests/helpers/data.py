"""Data files for the data and training tests."""

from __future__ import annotations

import io
import tarfile

from PIL import Image


def png(rgb=(255, 0, 0), size: int = 8) -> bytes:
    """A ``size`` x ``size`` PNG of one colour, as bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """A tar file of ``(name, bytes)`` members, in order (a WebDataset shard); returns its path."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def broken_shard(path, n_good: int, n_bad: int) -> None:
    members = []
    for i in range(n_good + n_bad):
        bad = i % ((n_good + n_bad) // n_bad) == 0 and i // ((n_good + n_bad) // n_bad) < n_bad
        members += [(f"s{i:03d}.png", b"\x89PNG garbage" if bad else png()), (f"s{i:03d}.txt", f"sample {i}.".encode())]
    write_tar(path, members)
