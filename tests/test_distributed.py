"""The process group's lifecycle: nothing with one process, no group created by library functions,
and under torchrun a rank that fails ends the whole run at once (no rank left waiting in a collective)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

import interleaf
from interleaf.distributed import DistributedError, current_state, distributed
from interleaf.evaluation import evaluate
from interleaf.training import parse_stage, train_stage

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_creates_no_group_and_lets_errors_through(clean_env):
    with distributed() as state:
        assert (state.rank, state.world_size, state.enabled) == (0, 1, False)
        assert not dist.is_initialized()
    clean_env.setenv("WORLD_SIZE", "1")
    with pytest.raises(KeyError, match="raised in the block"):  # raised, not turned into a process exit
        with distributed():
            raise KeyError("raised in the block")
    assert not dist.is_initialized()


def test_library_functions_never_create_a_group(clean_env, tmp_path):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 but no torch.distributed process group"):
        current_state()
    stage = parse_stage({"model": {"preset": "tiny-random"}, "out": str(tmp_path / "run"), "max_steps": 1})
    with pytest.raises(DistributedError, match="with interleaf.distributed.distributed"):
        train_stage(stage, progress=False)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
    # evaluate at top level opens the context, which needs torchrun's rendezvous variables: it says which
    model, processor = interleaf.build("tiny-random", seed=0)
    with pytest.raises(DistributedError, match="MASTER_ADDR, MASTER_PORT are not set.*torchrun --standalone"):
        evaluate(model, processor, "synth-vqa", data_dir=tmp_path, progress=False)
    assert not dist.is_initialized()


SCRIPT = """
from interleaf.errors import InputError
from interleaf.training import train
from interleaf.training.loop import default_stream
import yaml, sys

stage = yaml.safe_load(open(sys.argv[1]))

def rank1_breaks(stage, processor, rank, world):
    if rank == 1:
        raise InputError("shard of rank 1: broken.json line 3 is not JSON (fix or remove the line)")
    return default_stream(stage, processor, rank, world)

train({**stage, "out": sys.argv[2] + "/ok"}, progress=False)  # at top level: train() opens the group itself
train({**stage, "out": sys.argv[2] + "/bad"}, progress=False, stream_factory=rank1_breaks)
print("unreachable: both ranks passed the failing run", flush=True)
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_torchrun_run(tmp_path, synth_corpus):
    """Rank 1 raises while rank 0 enters the step's all-reduce; without the failure path rank 0 would wait
    there for the 30-minute collective timeout (the subprocess timeout below only guards against that hang)."""
    corpus = synth_corpus.get(n_train_scenes=8, n_heldout_scenes=2)
    stage = {
        "model": {"preset": "tiny-random"}, "max_steps": 1, "batch_size": 2, "max_length": 48,
        "data": {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
                              "images_root": str(corpus / "images")}]},
    }
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(interleaf.__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "script.py"), str(tmp_path / "stage.yaml"), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "error (rank 1 of 2): shard of rank 1: broken.json line 3 is not JSON" in run.stderr, output[-3000:]
    assert "unreachable" not in output
    assert (tmp_path / "ok" / "final" / "config.json").is_file() and (tmp_path / "ok" / "summary.json").is_file()
    assert not (tmp_path / "bad" / "final").exists()
