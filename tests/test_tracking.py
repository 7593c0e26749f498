"""Run tracking and progress: `report_to: [tensorboard]` mirrors metrics.jsonl's scalars (read back
with TensorBoard's own reader), `report_to: [wandb]` writes the same scalars to an offline W&B run
under OUT/wandb without touching the network (read back from the run file), nothing is tracked by
default, and the progress display is a bar on a terminal, plain periodic lines elsewhere, nothing on
other ranks."""

from __future__ import annotations

import io
import json
import math
import socket
import sys
from pathlib import Path

import pytest

from interleaf.errors import ConfigError
from interleaf.training import train
from interleaf.training.config import load_recipe
from interleaf.training.logging import MetricsLogger, wandb_mode


def _stage(tmp_path: Path, **kw) -> dict:
    good = '{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
    (tmp_path / "chat.jsonl").write_text("\n".join([good] * 6) + "\n")
    return {
        "model": {"preset": "tiny-random"}, "freeze": "all_trainable",
        "data": {"sources": [{"name": "chat", "format": "llava", "paths": str(tmp_path / "chat.jsonl")}]},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 1},
        "batch_size": 2, "max_steps": 3, "max_length": 32, "log_every": 1, "out": str(tmp_path / "run"), **kw,
    }


def _expected(record: dict) -> dict[str, float]:
    """metrics.jsonl's numbers under the tags TensorBoard gets: train/KEY, train/KEY/SUB for a mapping."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"train/{key}/{sub}": v for sub, v in value.items()})
        elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"train/{key}"] = value
    return out


def test_tensorboard_gets_the_scalars_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_stage(tmp_path, report_to=["tensorboard"]), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = {}
    for r in records:
        for tag, value in _expected(r).items():
            expected.setdefault(tag, {})[r["step"]] = value
    assert set(events.Tags()["scalars"]) == set(expected)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_by_source/chat"} <= set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, value in by_step.items():  # TensorBoard stores float32
            assert math.isclose(got[step], value, rel_tol=1e-6, abs_tol=1e-30), (tag, step)


def test_nothing_is_tracked_by_default_and_unknown_trackers_are_refused(tmp_path):
    train(_stage(tmp_path), progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert load_recipe(_stage(tmp_path)).stages[0].report_to == []
    with pytest.raises(ConfigError, match=r"report_to\[0\].*tensorboard.*wandb.*got 'mlflow'"):
        load_recipe(_stage(tmp_path, report_to=["mlflow"]))
    assert load_recipe(_stage(tmp_path, report_to=["wandb", "tensorboard"])).stages[0].report_to == ["wandb", "tensorboard"]


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=3, start_step=0, progress=False)
    with pytest.raises(ConfigError, match=r"'report_to': names tensorboard, which cannot be imported.*pip install"):
        logger.open_trackers(["tensorboard"])
    logger.close()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch, no_network):
    """W&B with no network and no files outside ``tmp_path``: the connections refused by
    ``no_network``, except the local (Unix) socket wandb talks to its own service process over;
    ``WANDB_MODE`` unset (interleaf's runs are offline by default). Yields ``(attempts, drain)``:
    the refused attempts, and what to call before reading a run back (``run.finish`` returns before
    wandb's service has written the run's last records; stopping the service writes them all)."""
    import _socket

    import wandb

    refused = socket.socket.connect

    def local_or_refused(self, address, *args):
        if self.family == socket.AF_UNIX:
            return _socket.socket.connect(self, address)
        return refused(self, address, *args)

    monkeypatch.setattr(socket.socket, "connect", local_or_refused)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    try:
        yield no_network, wandb.teardown
    finally:
        wandb.teardown()  # stops the service; it also removes the WANDB_SERVICE variable wandb.init set


def test_wandb_gets_the_scalars_of_metrics_jsonl_in_an_offline_run(tmp_path, offline_wandb):
    from helpers.wandb_records import read_run

    from interleaf.files import read_yaml

    attempts, drain = offline_wandb
    train(_stage(tmp_path, report_to=["wandb"]), progress=False)
    drain()
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    run = read_run(out / "wandb")
    assert run["exit_code"] == 0  # finished cleanly at the end of the stage
    assert run["config"] == read_yaml(out / "config.yaml") and run["config"]["report_to"] == ["wandb"]
    assert [row["_step"] for row in run["history"]] == [1, 2, 3]
    for r, row in zip(records, run["history"]):
        expected = _expected(r)
        assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_by_source/chat"} <= set(expected)
        assert set(row) - {"_step"} == set(expected), r["step"]
        for tag, value in expected.items():  # float64 both ways
            assert math.isclose(row[tag], value, rel_tol=1e-12, abs_tol=1e-300), (tag, r["step"])
    assert not (out / "tensorboard").exists()
    assert attempts == []  # nothing tried the network


def test_a_failed_stage_finishes_its_wandb_run_as_failed(tmp_path, offline_wandb):
    from helpers.wandb_records import read_run

    attempts, drain = offline_wandb
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=3, start_step=0, progress=False)
    logger.open_trackers(["wandb"], config={"name": "sft", "max_steps": 3})
    with pytest.raises(RuntimeError, match="boom"):
        try:
            logger.log({"step": 1, "loss": 2.5, "lr": 1e-3, "loss_by_source": {"chat": 2.0}, "skipped": "x"})
            raise RuntimeError("boom")
        finally:
            logger.close()
    drain()
    run = read_run(tmp_path / "wandb")
    assert run["exit_code"] == 1
    assert run["config"] == {"name": "sft", "max_steps": 3}
    assert run["history"] == [{"_step": 1, "train/loss": 2.5, "train/lr": 1e-3, "train/loss_by_source/chat": 2.0}]
    assert attempts == []


def test_a_stage_that_fails_midway_leaves_its_wandb_run_finished_as_failed(tmp_path, offline_wandb, monkeypatch):
    from helpers.wandb_records import read_run

    attempts, drain = offline_wandb
    monkeypatch.setenv("INTERLEAF_FAULT", "enospc:step=2")  # the disk fills up after step 2
    with pytest.raises(OSError):
        train(_stage(tmp_path, report_to=["wandb"]), progress=False)
    drain()
    run = read_run(tmp_path / "run" / "wandb")
    assert run["exit_code"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [row["_step"] for row in run["history"]] == [1, 2]
    assert [row["train/loss"] for row in run["history"]] == [r["loss"] for r in records]
    assert attempts == []


def test_an_online_run_without_credentials_is_a_config_error(tmp_path, offline_wandb, monkeypatch):
    attempts, _ = offline_wandb
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's explicit choice
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = MetricsLogger(tmp_path / "run", enabled=True, total_steps=3, start_step=0, progress=False)
    with pytest.raises(ConfigError, match=r"'report_to': names wandb, whose online run .* could not start.*wandb login"):
        logger.open_trackers(["tensorboard", "wandb"], config={"name": "sft"})
    assert attempts == []


def test_wandb_is_offline_unless_the_user_chooses_online_or_disabled(monkeypatch):
    for value, mode in [(None, "offline"), ("", "offline"), ("offline", "offline"), ("dryrun", "offline"),
                        ("run", "offline"), ("online", "online"), ("ONLINE", "online"), ("disabled", "disabled")]:
        if value is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", value)
        assert wandb_mode() == mode, value


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=3, start_step=0, progress=False)
    with pytest.raises(ConfigError, match=r"'report_to': names wandb, which cannot be imported.*pip install.*or wandb alone"):
        logger.open_trackers(["tensorboard", "wandb"])
    logger.close()
    assert not (tmp_path / "tensorboard").exists()  # no tracker starts when one of them cannot


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(stream, tmp_path: Path, *, enabled: bool = True) -> str:
    logger = MetricsLogger(tmp_path, enabled=enabled, total_steps=20, start_step=0, stream=stream)
    for step in range(1, 21):
        logger.step({"loss": 1.0 / step})
        if step % 10 == 0:
            logger.log({"step": step, "loss": 1.0 / step, "lr": 1e-4, "tokens_per_s": 1234.5})
    logger.write("done")
    logger.close()
    return stream.getvalue()


def test_progress_is_plain_lines_when_not_on_a_terminal(tmp_path):
    text = _drive(io.StringIO(), tmp_path)
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == ["step 10/20: loss 0.1000, lr 0.0001, 1234 tok/s",
                                 "step 20/20: loss 0.0500, lr 0.0001, 1234 tok/s", "done"]


def test_progress_is_a_bar_on_a_terminal_and_nothing_on_other_ranks(tmp_path):
    text = _drive(_Terminal(), tmp_path / "main")
    assert "\r" in text and "20/20" in text and "done" in text
    other = MetricsLogger(tmp_path / "other", enabled=False, total_steps=20, start_step=0, stream=_Terminal())
    other.open_trackers(["tensorboard", "wandb"])  # another rank: no tracker, no file
    other.close()
    assert _drive(_Terminal(), tmp_path / "other", enabled=False) == ""
    assert not (tmp_path / "other").exists()


def test_training_on_a_non_terminal_logs_lines_not_bar_fragments(tmp_path, capsys):
    train(_stage(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("step ")] == ["step 1/3", "step 2/3", "step 3/3"]
