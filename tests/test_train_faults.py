"""Training under faults, on a tiny model (single process, CPU):

- kill -9 at five moments drawn by a seeded RNG (after optimiser steps, and at points inside the
  checkpoint write), each followed by a resume: the final weights equal an uninterrupted run's bit for bit;
- a checkpoint write that fails for a full disk leaves the previous checkpoint intact, removes its
  temporary folder and stops with a message saying how to resume;
- a truncated or altered checkpoint is passed over at resume (the previous one is used); none left
  intact is an error naming each;
- a step with a non-finite loss changes no weight, is counted in the summary, and too many in a row stop the run.

The kills are synchronous (the trainer's ``INTERLEAF_FAULT`` hook SIGKILLs its own process at a
chosen step or checkpoint phase), so nothing depends on timing. The killed runs are forked from a
process that has imported interleaf once, which keeps each start to a fraction of a second.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.training import nan_at as _nan_at
from safetensors.torch import load_file

from interleaf.errors import CheckpointError, ConfigError, TrainingError
from interleaf.training import checkpoint as ckpt
from interleaf.training import train
from interleaf.training.config import load_recipe
from interleaf.training.distributed import DistState
from interleaf.training.loop import train_stage

STEPS, EVERY, KEEP = 10, 2, 2


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    return synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)


def _stage(corpus: Path, out: Path, **kw) -> dict:
    d = {
        "model": {"preset": "tiny-random"},
        "data": {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
                              "images_root": str(corpus / "images")}]},
        "freeze": "unfreeze_lm",
        "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 2},
        "batch_size": 2, "max_steps": STEPS, "max_length": 40, "log_every": 1,
        "checkpoint": {"every": EVERY, "keep_last": KEEP}, "out": str(out),
    }
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run of the stage every faulty run is compared with."""
    [result] = train(_stage(corpus, tmp_path_factory.mktemp("reference") / "run"), progress=False)
    return result


def _same_weights(out: Path, reference) -> None:
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(reference.final / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _ckpt_step(path: Path | None) -> int | None:
    return None if path is None else int(path.name.split("-")[1])


# --------------------------------------------------------------------------- kill -9

# A process that imports interleaf once, then forks one child per training run it is sent (a JSON
# line: stage, fault, resume, thread count, log file) and answers with how the child ended. Each run
# is a real process killed by a real SIGKILL, at a fraction of a second's start-up.
_ZYGOTE = r"""
import json, os, sys
import torch
import interleaf.api, interleaf.data.stream, interleaf.training.loop
from interleaf.training import train

sys.path.insert(0, sys.argv[1])
from helpers.training import nan_at as _nan_at

for line in sys.stdin:
    job = json.loads(line)
    pids = []
    for rank, env in enumerate(job["processes"]):
        pid = os.fork()
        if pid == 0:
            log = os.open(f"{job['log']}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ.update(env, INTERLEAF_FAULT=job["fault"])
            torch.set_num_threads(job["threads"])
            nan_at = {int(r): steps for r, steps in job["nan_at"].items()}
            code = 0
            try:
                train(job["stage"], resume=job["resume"], progress=False,
                      stream_factory=_nan_at(nan_at) if nan_at else None)
            except BaseException as e:
                print(f"{type(e).__name__}: {e}", flush=True)
                code = 1
            os._exit(code)
        pids.append(pid)
    ended = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        ended.append({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})
    print(json.dumps(ended), flush=True)
"""


class Zygote:
    def __init__(self):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(ckpt.FAULT_ENV, None)
        # its own process group: close() ends it and every child it forked (a hung one included)
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(Path(__file__).parent)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)

    def run(self, stage: dict, fault: str = "", *, resume: bool = False, log: Path, processes: list[dict] | None = None,
            nan_at: dict[int, list[int]] | None = None) -> list[dict]:
        """Train ``stage`` in fresh children (one per entry of ``processes``: its environment) with
        ``INTERLEAF_FAULT=fault``; how each ended. Child r writes ``{log}.{r}``."""
        job = {"stage": stage, "fault": fault, "resume": resume, "threads": torch.get_num_threads(), "log": str(log),
               "processes": processes or [{}], "nan_at": {str(r): s for r, s in (nan_at or {}).items()}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)  # a hang guard only: nothing waits on time
        if not ready:
            self.close()
            pytest.fail(f"the training children did not end within 120 s (a hang); their logs: {_tail(log)}")
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def _tail(log: Path) -> str:
    return "".join(p.read_text()[-2000:] for p in sorted(log.parent.glob(log.name + ".*")))


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


# The phases of a checkpoint write, in three groups: while the temporary folder fills, once it is
# complete but not yet renamed, after the rename (before or after the oldest one is pruned).
PHASE_GROUPS = (("rank_files", "weights", "optimizer", "trainer_state"), ("manifest", "rename"), ("prune", "done"))


def _moments(seed: int) -> list[tuple[int, str]]:
    """Five moments at distinct steps, in run order: three inside checkpoint writes (a random phase
    of each group, at random checkpoint steps), two right after an optimiser step. Distinct steps
    keep every moment reachable after the resume that follows the previous one."""
    rng = random.Random(seed)
    ckpt_steps = rng.sample(range(EVERY, STEPS, EVERY), 3)
    moments = [(s, f"checkpoint.{rng.choice(group)}") for s, group in zip(ckpt_steps, PHASE_GROUPS)]
    moments += [(s, "step") for s in rng.sample([s for s in range(1, STEPS) if s not in ckpt_steps], 2)]
    return sorted(moments)


def _expected_latest(step: int, point: str, every: int) -> int | None:
    """The newest complete checkpoint after a kill at (step, point)."""
    complete = point == "step" or point in ("checkpoint.prune", "checkpoint.done")
    last = step // every * every if complete else step - every  # a write killed before its rename does not count
    return last or None


def _kill_and_resume(zygote: Zygote, stage: dict, moments: list[tuple[int, str]], every: int, logs: Path):
    """Kill a run at each moment in turn (each run but the first resumes), then resume to the end."""
    out = Path(stage["out"])
    for i, (step, point) in enumerate(moments):
        log = logs / f"run{i}.log"
        [ended] = zygote.run(stage, f"kill:{point}={step}", resume=i > 0, log=log)
        assert ended["signal"] == signal.SIGKILL, (step, point, ended, _tail(log))
        assert not (out / "final").exists()
        assert _ckpt_step(ckpt.latest_checkpoint(out)) == _expected_latest(step, point, every), (step, point)
        half_written = out / "checkpoints" / f".tmp-step-{step:08d}"
        assert half_written.is_dir() == (point not in ("step", "checkpoint.prune", "checkpoint.done")), (step, point)
        on_disk = ckpt.list_checkpoints(out)
        assert len(on_disk) <= KEEP + (point == "checkpoint.prune"), (step, point, on_disk)  # pruned only after
    [result] = train(stage, resume=True, progress=False)  # the last resume runs to the end
    assert not list((out / "checkpoints").glob(".tmp-*"))  # every later save cleared what a kill left
    return result


@pytest.mark.slow
def test_kill_9_at_five_seeded_moments_then_resume_matches_an_uninterrupted_run(corpus, reference, zygote, tmp_path):
    moments = _moments(seed=20261130)
    assert len({s for s, _ in moments}) == 5 and sum(p != "step" for _, p in moments) == 3
    assert sorted(sum(PHASE_GROUPS, ())) == sorted(ckpt.CHECKPOINT_PHASES)
    out = tmp_path / "killed"
    _kill_and_resume(zygote, _stage(corpus, out), moments, EVERY, tmp_path)
    _same_weights(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((reference.out / "summary.json").read_text())
    for key in ("steps", "tokens_seen", "trained_tokens_seen", "samples_seen", "final_loss", "nonfinite_steps"):
        assert summary[key] == expected[key], key
    assert [_ckpt_step(p) for p in ckpt.list_checkpoints(out)] == [STEPS - EVERY, STEPS]  # keep_last: 2


@pytest.mark.slow
def test_kill_9_in_every_phase_of_a_checkpoint_write_then_resume(corpus, reference, zygote, tmp_path):
    # a checkpoint every step, killed in phase i of the write at step i + 1; checkpoints do not change
    # the training itself, so the uninterrupted run with checkpoints every 2 steps is the reference
    moments = [(i + 1, f"checkpoint.{phase}") for i, phase in enumerate(ckpt.CHECKPOINT_PHASES)]
    assert moments[-1][0] < STEPS
    out = tmp_path / "killed"
    _kill_and_resume(zygote, _stage(corpus, out, checkpoint={"every": 1, "keep_last": KEEP}), moments, 1, tmp_path)
    _same_weights(out, reference)


# --------------------------------------------------------------------------- a full disk, damaged checkpoints


def test_full_disk_keeps_the_previous_checkpoint_and_a_damaged_one_is_passed_over(
    corpus, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    stage = _stage(corpus, out)
    monkeypatch.setenv(ckpt.FAULT_ENV, "enospc:checkpoint.optimizer=6")  # the disk fills while optimizer.pt is written
    with pytest.raises(CheckpointError) as e:
        train(stage, progress=False)
    message = str(e.value)
    root = out / "checkpoints"
    for part in ("checkpoint of step 6", "No space left on device", "optimizer.pt", "unfinished folder was removed",
                 f"previous checkpoint {root / 'step-00000004'} (step 4) is intact", "--resume"):
        assert part in message, (part, message)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]  # no .tmp-*, nothing pruned
    assert all(ckpt.verify_checkpoint(p) is None for p in ckpt.list_checkpoints(out))
    monkeypatch.delenv(ckpt.FAULT_ENV)

    # the newest checkpoint is truncated: resume names it and continues from the one before
    weights = root / "step-00000004" / "trainable.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    model = torch.nn.Linear(2, 2)  # checked before anything is loaded; verified above, changed since: checked again
    with pytest.raises(CheckpointError, match="step-00000004' is damaged: trainable.safetensors has"):
        ckpt.load_checkpoint(root / "step-00000004", model=model, optimizer=torch.optim.AdamW(model.parameters()),
                             dist=DistState(), fingerprint=None)
    capsys.readouterr()
    train(stage, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"resuming from {root / 'step-00000002'}" in err
    assert f"{root / 'step-00000004'} is unusable (trainable.safetensors has {size // 2} bytes" in err
    _same_weights(out, reference)  # steps 3..10 trained again: the same weights as a run without faults

    # one byte changed in place (same size) and a missing manifest: with no intact checkpoint, resuming is an error
    optimizer = root / f"step-{STEPS:08d}" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    (root / f"step-{STEPS - EVERY:08d}" / "manifest.json").unlink()
    [config] = load_recipe(stage).stages
    with pytest.raises(CheckpointError) as e:
        train_stage(config, resume=True, progress=False)
    message = str(e.value)
    assert "no intact checkpoint" in message and "remov" in message and str(root) in message
    assert f"{root / f'step-{STEPS:08d}'} is unusable (optimizer.pt does not match its sha256" in message
    assert f"{root / f'step-{STEPS - EVERY:08d}'} is unusable (it has no manifest.json" in message


def test_a_failed_write_prunes_nothing_even_with_keep_last_1(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stage = _stage(corpus, out, max_steps=4, checkpoint={"every": 2, "keep_last": 1})
    monkeypatch.setenv(ckpt.FAULT_ENV, "enospc:checkpoint.manifest=4")
    with pytest.raises(CheckpointError, match=r"previous checkpoint .*step-00000002 \(step 2\) is intact"):
        train(stage, progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # kept until step 4 is complete


def test_a_bad_fault_spec_names_the_variable(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_ENV, "kill:checkpoint.middle=2")
    with pytest.raises(ConfigError, match=r"INTERLEAF_FAULT.*kill:checkpoint\.middle=2.*checkpoint\.rename"):
        train(_stage(corpus, tmp_path / "run", max_steps=2), progress=False)


# --------------------------------------------------------------------------- non-finite losses


def test_nonfinite_loss_skips_the_step_and_is_counted(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    stage = _stage(corpus, out, max_steps=7, checkpoint={"every": 1, "keep_last": 10}, max_nonfinite_steps=3)
    capsys.readouterr()
    [result] = train(stage, progress=False, stream_factory=_nan_at([2, 4, 5]))
    # which steps moved the trainable weights: compare each step's checkpoint with the one before
    import interleaf

    start, _ = interleaf.build("tiny-random", seed=0)
    before = {k: v for k, v in start.state_dict().items()}
    moved = []
    for step in range(1, 8):
        after = load_file(str(out / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in after.values()), step
        if any(not torch.equal(after[k], before[k]) for k in after):
            moved.append(step)
        before = after
    assert moved == [1, 3, 6, 7]
    optim = torch.load(out / "checkpoints" / "step-00000007" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["state"].values()} == {4.0}  # AdamW stepped 4 times, not 7

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["nonfinite_steps"] == 3 and summary["nonfinite_at"] == [2, 4, 5]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2, 4, 5]
    assert all(r["loss"] is None and r["skipped"] == "the loss is nan" for r in records if r.get("skipped"))
    assert all(isinstance(r["loss"], float) for r in records if not r.get("skipped"))
    err = capsys.readouterr().err
    assert "steps skipped for a non-finite loss or gradient: 3 (at step 2, 4, 5)" in err
    assert "step 5: the loss is nan; the step was skipped (2 in a row, the limit is max_nonfinite_steps: 3)" in err
    assert summary["final_loss"] == records[-1]["loss"]


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_and_resume_keeps_the_count(corpus, tmp_path):
    out = tmp_path / "run"
    stage = _stage(corpus, out, max_steps=6, max_nonfinite_steps=3)
    with pytest.raises(TrainingError) as e:
        train(stage, progress=False, stream_factory=_nan_at([3, 4, 5]))
    message = str(e.value)
    for part in ("3 steps in a row", "steps 3, 4, 5", "the loss is nan", "max_nonfinite_steps: 3",
                 "did not change the weights", "optim.lr", f"latest checkpoint is {out / 'checkpoints' / 'step-00000004'}",
                 "--resume"):
        assert part in message, (part, message)
    assert not (out / "final").exists()
    state = ckpt.read_trainer_state(out / "checkpoints" / "step-00000004")
    assert state["nonfinite_steps"] == [3, 4] and state["nonfinite_in_a_row"] == 2
    # resumed on clean data from step 4: the two skipped steps stay counted
    [result] = train(stage, resume=True, progress=False)
    assert result.summary["nonfinite_steps"] == 2 and result.summary["nonfinite_at"] == [3, 4]


def test_a_run_whose_every_step_is_skipped_ends_with_no_final_loss(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    [result] = train(_stage(corpus, out, max_steps=2, checkpoint={"every": None}), progress=False,
                     stream_factory=_nan_at([1, 2]))
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["final_loss"] is None and summary["nonfinite_at"] == [1, 2]
    assert "final loss none (every step was skipped)" in capsys.readouterr().err


def test_max_nonfinite_steps_is_validated(corpus, tmp_path):
    from interleaf.errors import ConfigError

    with pytest.raises(ConfigError, match="max_nonfinite_steps.*integer >= 1"):
        load_recipe(_stage(corpus, tmp_path / "run", max_nonfinite_steps=0))
    assert load_recipe(_stage(corpus, tmp_path / "run")).stages[0].max_nonfinite_steps == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_skip_together_when_one_sees_a_nonfinite_loss(corpus, zygote, tmp_path, strategy):
    # 2 processes over gloo; process 1 alone gets NaN images at step 2, process 0 alone at step 4. Both
    # must skip both steps: the gradients are averaged, so the NaN reaches every process, and under FSDP
    # the gradient norm is a collective, so a process deciding alone would desynchronise the others.
    out = tmp_path / "run"
    stage = _stage(corpus, out, max_steps=5, batch_size=4, checkpoint={"every": 1, "keep_last": 10},
                   distributed={"strategy": strategy})
    port = _free_port()
    processes = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in (0, 1)]
    ended = zygote.run(stage, log=tmp_path / "run.log", processes=processes, nan_at={1: [2], 0: [4]})
    assert ended == [{"signal": None, "exit": 0}] * 2, _tail(tmp_path / "run.log")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["nonfinite_at"] == [2, 4]
    steps = [load_file(str(out / "checkpoints" / f"step-{n:08d}" / "trainable.safetensors")) for n in range(1, 6)]
    assert all(torch.isfinite(t).all() for w in steps for t in w.values())
    moved = [n + 2 for n in range(4) if any(not torch.equal(steps[n][k], steps[n + 1][k]) for k in steps[n])]
    assert moved == [3, 5]


@pytest.mark.parametrize("spec", ["kill", "explode:step=3", "kill:checkpoint.nowhere=3", "enospc:step=three"])
def test_a_malformed_fault_hook_names_the_variable_and_the_format(monkeypatch, spec):
    from interleaf.errors import ConfigError
    from interleaf.training.checkpoint import fault_point

    monkeypatch.setenv("INTERLEAF_FAULT", spec)
    with pytest.raises(ConfigError, match="INTERLEAF_FAULT") as info:
        fault_point("step", 3)
    assert repr(spec) in str(info.value) and "ACTION:POINT=STEP" in str(info.value)
