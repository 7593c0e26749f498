"""A run killed with SIGKILL after a checkpoint and resumed with --resume ends with the same weights
(bitwise) as a run that never stopped (single process, CPU), for every model family. The command line end to end; the
kills at other moments (inside checkpoint writes) are in test_train_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.families import FAMILIES, stage_model
from safetensors.torch import load_file

from interleaf.training import train
from interleaf.training import checkpoint as ckpt


def _stage(corpus: Path, out: Path, family: str) -> dict:
    return {
        "model": stage_model(family),
        "data": {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
                              "images_root": str(corpus / "images")}]},
        "freeze": "unfreeze_lm",
        "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 2},
        "batch_size": 2, "max_steps": 6, "max_length": 40 + (15 if family in ("expand", "replace") else 0), "log_every": 1,
        "checkpoint": {"every": 2, "keep_last": 2}, "out": str(out),
    }


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "interleaf", "train", str(config), "--no-progress", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys, synth_corpus, family):
    corpus = synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)
    out = tmp_path / "killed"
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(_stage(corpus, out, family)))
    # the same thread count as this process (conftest uses one), so float sums run in the same order
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # The trainer SIGKILLs itself right after step 3 (INTERLEAF_FAULT): after the checkpoint of step 2,
    # before the one of step 4, whatever the machine's speed. The timeout is only a hang guard.
    env[ckpt.FAULT_ENV] = "kill:step=3"
    with open(tmp_path / "killed.log", "w") as log:
        returncode = subprocess.run(_cli(config), stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"] and not (out / "final").exists()
    killed_at = 2

    from interleaf.cli import main

    with pytest.raises(SystemExit) as e:  # the same command with --resume (in this process, to save a start-up)
        main(["train", str(config), "--no-progress", "--resume"])
    assert e.value.code == 0
    assert f"at step {killed_at}" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # the killed run logged steps 1-3, the resumed one 3-6
    restart = 3

    [reference] = train(_stage(corpus, tmp_path / "reference", family), progress=False)
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(reference.final / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    ref_losses = [json.loads(x)["loss"] for x in (reference.out / "metrics.jsonl").read_text().splitlines()]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[restart:] == ref_losses[killed_at:]
