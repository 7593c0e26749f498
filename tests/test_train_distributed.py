"""torchrun with 2 processes (gloo on CPU): DDP and FSDP2 give the loss curve of one process with
the same global batch, within 1e-4 relative; each process reads its own half of the data. For every
model family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.families import FAMILIES, stage_model
from helpers.training import train_with_torchrun

import interleaf
from interleaf.training import train

REL = 1e-4  # summation order differs between 1 and 2 processes; everything else is identical


@pytest.mark.slow
def test_ddp_and_fsdp_match_a_single_process(tmp_path, synth_corpus):
    """Every family (helpers.families) in one torchrun: a DDP and an FSDP2 stage each."""
    corpus = synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)
    stage = {
        "model": {"preset": "tiny-random"},
        "data": {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
                              "images_root": str(corpus / "images")}]},
        "freeze": "unfreeze_lm", "optim": {"lr": 3e-3, "warmup_steps": 1},
        "batch_size": 4, "max_steps": 4, "max_length": 40, "log_every": 1, "checkpoint": {"every": 2},
    }
    # each family's model and room for its image tokens (16 LM positions per image in both placements)
    own = {f: {"model": stage_model(f), "max_length": 40 + (15 if f in ("expand", "replace") else 0)} for f in FAMILIES}
    own["cross_attention"] = {}  # the stage as it is
    stages = [{"name": f"{strategy}{'' if f == 'cross_attention' else '-' + f}", "distributed": {"strategy": strategy},
               **own[f]} for f in FAMILIES for strategy in ("ddp", "fsdp")]
    recipe = {**stage, "out": str(tmp_path / "multi"), "stages": stages}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    train_with_torchrun(config)

    def losses(out: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    for family in FAMILIES:
        [single] = train({**stage, **own[family], "out": str(tmp_path / f"single-{family}")}, progress=False)
        expected = losses(single.out)
        assert len(expected) == 4
        single_weights = interleaf.load(single.final)[0].state_dict()
        for strategy in ("ddp", "fsdp"):
            name = f"{strategy}{'' if family == 'cross_attention' else '-' + family}"
            out = tmp_path / "multi" / name
            assert losses(out) == pytest.approx(expected, rel=REL), name
            summary = json.loads((out / "summary.json").read_text())
            assert summary["processes"] == 2 and summary["samples_read_by_source"] == {"vqa": 16}
            ckpt = out / "checkpoints" / "step-00000004"
            assert (ckpt / "data_rank0.json").is_file() and (ckpt / "data_rank1.json").is_file()
            states = [json.loads((ckpt / f"data_rank{r}.json").read_text()) for r in (0, 1)]
            assert [s["rank"] for s in states] == [0, 1] and all(s["samples_seen"] == 8 for s in states)
            weights = interleaf.load(out / "final")[0].state_dict()
            assert max((weights[k] - single_weights[k]).abs().max().item() for k in weights) < 1e-4, name
