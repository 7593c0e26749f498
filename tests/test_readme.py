"""The README's Python quickstart runs as written (with a local photo)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart in Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "photo.jpg")
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert (tmp_path / "my-model" / "config.json").exists()
    # the loss is the shifted cross-entropy over the labelled tokens, computed here by hand with the
    # reloaded model (the same weights)
    batch, labels = namespace["batch"], namespace["labels"]
    with torch.no_grad():
        logits = namespace["model"](**batch).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert float(namespace["loss"].detach()) == pytest.approx(float(by_hand), rel=1e-5)
