"""The trainer makes no host synchronisation per micro-batch: the forward, the loss, the backward
and the metrics of a micro-batch queue device work without reading any of it back, on both fusion
families, with and without z-loss, over a mixture of two sources (the per-source losses); and the
same for a DPO stage, with either reference.

What is measured (see :mod:`interleaf.training.step`):

- a micro-batch: :func:`interleaf.training.step.micro_batch`, from the collated CPU batch to the
  backward pass and the device-side sums: no syncing operation in the trainer's code;
- an optimiser step: :func:`interleaf.training.step.optimizer_step`, without the counting on the
  collated CPU tensors before the batches move (:func:`~interleaf.training.step.plan_step`,
  :func:`~interleaf.training.dpo.plan_pairs`: host tensors, not device values) and without torch's
  optimiser update (AdamW reads its step counters, which are host tensors): exactly one read, the step's losses and gradient norm together, which
  decides whether the weights are updated;
- the log: a step that writes a record reads the per-source sums once; the others read nothing.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from helpers.families import FAMILIES, POLICIES, stage_model
from helpers.host_sync import HostSyncs

from interleaf.training import dpo, loop, report, step, train

TRAINER = ("interleaf/training/", "interleaf/model/loss.py")  # the trainer's code: the step, the loss, the log
OPTIM = str(Path(torch.optim.__file__).parent)
HOST_COUNTING = (step.plan_step.__code__, dpo.plan_pairs.__code__)  # counting on the collated CPU batches


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    return synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)


def _stage(corpus, out, family: str, z_loss: float) -> dict:
    sources = [
        {"name": "pairs", "format": "pairs", "paths": str(corpus / "pairs" / "*.tar"), "weight": 1},
        {"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
         "images_root": str(corpus / "images"), "weight": 1, "loss_weight": 0.5},
    ]
    return {
        "model": stage_model(family), "data": {"sources": sources}, "freeze": POLICIES[family][0],
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "clip_grad_norm": 1.0},
        "batch_size": 4, "grad_accum": 2, "max_steps": 3, "log_every": 2, "z_loss": z_loss,
        "max_length": 96, "out": str(out),
    }


class DeviceSyncs(HostSyncs):
    """:class:`HostSyncs` that leaves out what runs on host tensors: the counting on the collated CPU
    batches (:data:`HOST_COUNTING`) and torch's optimiser update."""

    def skip(self, frame) -> bool:
        while frame is not None:
            if frame.f_code in HOST_COUNTING or frame.f_code.co_filename.startswith(OPTIM):
                return True
            frame = frame.f_back
        return False


class Recorder:
    """Wraps ``owner.name`` so that each call runs under its own recorder (``kind``)."""

    def __init__(self, monkeypatch, owner, name: str, kind=HostSyncs):
        self.calls: list[HostSyncs] = []
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with kind() as syncs:
                result = real(*args, **kwargs)
            self.calls.append(syncs)
            return result

        monkeypatch.setattr(owner, name, wrapped)

    def per_call(self, files: tuple[str, ...] = ("interleaf/",)) -> list[list[tuple[str, str]]]:
        """Each call's syncing operations made by interleaf's code in ``files``."""
        return [[(n, w) for n, w in s.in_interleaf() if w.startswith(files)] for s in self.calls]


def _train(stage: dict, monkeypatch, steps: int = 3, micro_per_step: int = 2):
    """Train ``stage`` with each micro-batch, optimiser step and log call recorded."""
    objective = stage.get("objective", "lm")
    micro = Recorder(monkeypatch, *((dpo, "_micro_batch") if objective == "dpo" else (step, "micro_batch")))
    steps_ = Recorder(monkeypatch, loop, "dpo_step" if objective == "dpo" else "optimizer_step", DeviceSyncs)
    logs = Recorder(monkeypatch, report.StageReport, "after_step")
    train(stage, progress=False)
    records = [json.loads(line) for line in (Path(stage["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(records[-1]["loss_by_source"]) == 2  # both sources reported
    assert len(micro.calls) == steps * micro_per_step and len(steps_.calls) == steps and len(logs.calls) == steps
    return micro, steps_, logs


def _check(micro: Recorder, steps: Recorder, logs: Recorder) -> None:
    for calls in micro.per_call(TRAINER):
        assert calls == [], calls
    for calls in steps.per_call(TRAINER):  # the one read of the step's sums and gradient norm
        assert [n for n, _ in calls] == ["tolist"] and calls[0][1].startswith("interleaf/training/step.py"), calls
    # the log: steps 2 and 3 (log_every: 2, and the last step) read the per-source sums, step 1 nothing
    assert [len(c) for c in logs.per_call()] == [0, 1, 1]


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_host_sync_per_micro_batch_and_one_per_optimizer_step(corpus, tmp_path, monkeypatch, family, z_loss):
    _check(*_train(_stage(corpus, tmp_path / "run", family, z_loss), monkeypatch))


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory) -> Path:
    """Two preference sources over four one-colour images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("prefs")
    (root / "images").mkdir()
    names = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    for name, rgb in names.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{name}.png")
    colours = list(names)
    pairs = [{"id": f"p{i}", "image": f"{colours[i % 4]}.png", "prompt": "<image>\nWhat colour is the image?",
              "chosen": colours[i % 4], "rejected": colours[(i + 1) % 4]} for i in range(8)]
    (root / "a.json").write_text(json.dumps(pairs[:5]))
    (root / "b.json").write_text(json.dumps(pairs[5:]))
    return root


@pytest.mark.parametrize("reference", ["model", "cached"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_host_sync_per_dpo_micro_batch_and_one_per_optimizer_step(preference_data, tmp_path, monkeypatch, family,
                                                                     reference):
    root = preference_data
    sources = [{"name": name, "format": "preference", "paths": str(root / f"{name}.json"),
                "images_root": str(root / "images")} for name in ("a", "b")]
    stage = {
        "model": stage_model(family), "objective": "dpo", "dpo": {"beta": 0.5, "reference": reference},
        "data": {"sources": sources}, "freeze": POLICIES[family][0],
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0}, "batch_size": 4, "grad_accum": 2,
        "max_steps": 3, "log_every": 2, "max_length": 64 + (15 if family != "cross_attention" else 0),
        "out": str(tmp_path / "run"),
    }
    _check(*_train(stage, monkeypatch))


def _model_syncs(recorder: Recorder) -> collections.Counter:
    return collections.Counter(w for calls in recorder.per_call() for _, w in calls if not w.startswith(TRAINER))


# Where the model's training forward reads the device: laying out the batch's images, whose counts and places come
# from the text (which images are real, how many embeddings each row takes, where xGen-MM's grown rows put each
# token: once per call, the grown rows once per row). Nothing else in a forward may read the device.
IMAGE_LAYOUT = {"encode_images", "prepare_media", "images_per_row", "write_image_embeddings", "expand_image_tokens",
                "replace_placement", "text_positions"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_forward_of_a_micro_batch_reads_the_device_only_to_lay_out_images(corpus, tmp_path, monkeypatch,
                                                                                    family):
    micro, _, _ = _train(_stage(corpus, tmp_path / "run", family, 0.0), monkeypatch)
    syncs = _model_syncs(micro)
    assert syncs  # the corpus has images: the layout is read (a test that could not fail otherwise)
    elsewhere = {w: n for w, n in syncs.items() if w.rsplit("(", 1)[-1].rstrip(")") not in IMAGE_LAYOUT}
    assert not elsewhere, elsewhere
