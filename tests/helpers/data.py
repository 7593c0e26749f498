"""Data files for the data and training tests."""

from __future__ import annotations

import io
import tarfile

from PIL import Image


def png(rgb=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def broken_shard(path, n_good: int, n_bad: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n_good + n_bad):
            bad = i % ((n_good + n_bad) // n_bad) == 0 and i // ((n_good + n_bad) // n_bad) < n_bad
            members = [(f"s{i:03d}.png", b"\x89PNG garbage" if bad else png()), (f"s{i:03d}.txt", f"sample {i}.".encode())]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
