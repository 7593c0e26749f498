"""DPO in interleaf's trainer: preference data (format, tokens, bad samples), the log-probabilities
and the loss against direct computations, the reference (a frozen copy or a cache, the same
numbers), learning on a tiny preference set, resume, and each bad configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers.families import FAMILIES, POLICIES, build_family, stage_model
from helpers.training import train_with_torchrun
from PIL import Image

import interleaf
from interleaf.data.formats import LlavaRecord
from interleaf.data.mixture import load_mixture
from interleaf.data.preference import collate_preference, encode_preference, parse_preference
from interleaf.data.stream import MixtureStream, iter_source
from interleaf.data.tokenize import IGNORE_INDEX
from interleaf.errors import ConfigError, InputError, TrainingError
from interleaf.model.loss import dpo_loss, sequence_logps
from interleaf.training import checkpoint as ckpt
from interleaf.training import load_recipe, train
from interleaf.training.dpo import ModelReference, cache_reference
from interleaf.training.prepare import default_stream
from interleaf.training.distributed import DistState

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def _write_images(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")


def _pairs(n: int = 8) -> list[dict]:
    """Image i is colour i; chosen names it, rejected names the next colour: every word is chosen
    for one image and rejected for another, so only a model that looks at the image can prefer
    every chosen answer."""
    names = list(COLOURS)
    return [{"id": f"p{i}", "image": f"{names[i % 4]}.png", "prompt": "<image>\nWhat colour is the image?",
             "chosen": names[i % 4], "rejected": names[(i + 1) % 4]} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``images/``, ``prefs.json`` (8 pairs) and ``mix.yaml`` (a mixture of it, paths relative)."""
    root = tmp_path_factory.mktemp("prefs")
    _write_images(root / "images")
    (root / "prefs.json").write_text(json.dumps(_pairs()))
    mix = {"sources": [{"name": "prefs", "format": "preference", "paths": "prefs.json", "images_root": "images"}]}
    (root / "mix.yaml").write_text(yaml.safe_dump(mix))
    return root


def _stage(root: Path, out: Path, reference: str = "cached", family: str = "cross_attention", **kw) -> dict:
    d = {
        "model": stage_model(family), "objective": "dpo", "dpo": {"beta": 0.5, "reference": reference},
        "data": str(root / "mix.yaml"), "freeze": "all_trainable",
        "optim": {"lr": 3e-3, "schedule": "constant", "warmup_steps": 0},
        # LLaVA's placement writes an image as its 16 vision tokens
        "batch_size": 4, "max_steps": 3, "max_length": 64 + (15 if family in ("expand", "replace") else 0), "log_every": 1,
        "out": str(out),
    }
    d.update(kw)
    return d


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _direct_logp(model, row: dict) -> float:
    """log_softmax of the model's logits on this one row, gathered at the next tokens the labels score, summed."""
    ids = torch.tensor([row["input_ids"]])
    pixels = torch.stack(row["images"])[None] if row["images"] else None
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[t, row["input_ids"][t + 1]]) for t in range(len(ids[0]) - 1)
               if row["labels"][t + 1] != IGNORE_INDEX)


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("family", FAMILIES)
def test_margin_grows_and_reward_accuracy_rises(data, tmp_path, family):
    out = tmp_path / "run"
    [result] = train(_stage(data, out, family=family, max_steps=30), progress=False)
    records = _records(out)
    assert len(records) == 30
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "loss_by_source"} <= set(records[0])
    # step 1: the policy is the reference, so every reward is 0 and the loss is log 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == 0 and records[0]["rewards/accuracies"] == 0
    margins = [r["rewards/margins"] for r in records]
    accuracies = [r["rewards/accuracies"] for r in records]
    for r in records:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-9)
    # Means over the first and the last five steps, measured at seed 0: margins -0.18 -> 2.54,
    # accuracies 0.30 -> 1.00 (seeds 0-5: last-five margins 0.63-3.56, accuracies 1.00 on every seed).
    # Token insertion learns faster (the image's embeddings go straight into the LM): seeds 0-3 give
    # margins 0.2-0.9 -> 7.5-9.1 and accuracies 0.4-0.7 -> 1.00, in both placements.
    assert _mean(margins[-5:]) > 0.3 and _mean(margins[-5:]) > _mean(margins[:5]) + 0.3
    assert _mean(accuracies[-5:]) >= 0.8 and _mean(accuracies[:5]) <= (0.6 if family == "cross_attention" else 0.75)
    assert _mean([r["loss"] for r in records[-5:]]) < 0.6  # log 2 = 0.69 at the start
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["bad_samples"] == {}
    assert (result.final / "config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_logps_are_the_direct_computation(data, tmp_path, family):
    """The step's logged log-probabilities (the policy at step 1 is the starting model) against
    log_softmax of the model's logits on each row alone, summed over the answer's tokens."""
    out = tmp_path / "run"
    stage = _stage(data, out, reference="model", family=family, max_steps=1)
    train(stage, progress=False)
    [record] = _records(out)
    model, processor = interleaf.build(**stage["model"], seed=0)  # the stage's model, gates as built
    recipe = load_recipe(stage)
    samples = MixtureStream(recipe.stages[0].mixture(), processor, seed=0).take(4)  # the step's batch
    chosen = [_direct_logp(model, s["chosen"]) for s in samples]
    rejected = [_direct_logp(model, s["rejected"]) for s in samples]
    assert record["logps/chosen"] == pytest.approx(_mean(chosen), rel=1e-5)
    assert record["logps/rejected"] == pytest.approx(_mean(rejected), rel=1e-5)
    # and sequence_logps on the padded batch of all eight rows, row by row
    batch = collate_preference(samples, processor.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
    logps, counts = sequence_logps(logits, batch["labels"])
    assert logps.tolist() == pytest.approx(chosen + rejected, rel=1e-5)
    rows = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    assert counts.tolist() == [sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows]


def test_dpo_loss_is_the_formula():
    pc, pr, rc, rr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.5])
    beta = 0.1
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: h = (-1 + 3) - (-2 + 2.5) = 1.5; pair 1: h = (-4 + 2) - (-3 + 2.5) = -1.5
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))], rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, -0.1]) and rejected.tolist() == pytest.approx([-0.05, 0.05])
    # conservative DPO: eps of the labels taken as flipped
    eps = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)) for h in (1.5, -1.5)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # the gradient flows to the policy only
    pc.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta)[0].sum().backward()
    assert pc.grad is not None and torch.all(pc.grad < 0)  # raising the chosen log-prob lowers the loss


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_model_references_give_the_same_numbers(data, tmp_path, family):
    runs = {}
    for reference in ("model", "cached"):
        train(_stage(data, tmp_path / reference, reference=reference, family=family, max_steps=3), progress=False)
        runs[reference] = _records(tmp_path / reference)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen")
    for a, b in zip(runs["model"], runs["cached"]):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert runs["model"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["model"][2]["rewards/chosen"] != 0  # after two updates the reference matters
    # the cache holds, for every pair, the frozen copy's log-probabilities of that pair alone
    model, processor = interleaf.build(**stage_model(family), seed=0)
    stage = load_recipe(_stage(data, tmp_path / "x", family=family)).stages[0]
    model.train()
    cache = cache_reference(stage, model, processor, DistState(), batch_pairs=3)
    assert len(cache.table) == 8 and model.training  # the pass leaves the model's mode as it was
    frozen = ModelReference(model)
    for s in MixtureStream(stage.mixture(), processor, epochs=1):
        batch = collate_preference([s], processor.pad_token_id)
        c, r = frozen.logps([s], batch, stage, torch.device("cpu"))
        assert cache.table[("prefs", s["pair"])] == pytest.approx((float(c[0]), float(r[0])), rel=1e-5)
    assert not any(p.requires_grad for p in frozen.model.parameters()) and not frozen.model.training


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_continues_as_an_uninterrupted_run(data, tmp_path, monkeypatch, family):
    """The cached reference is computed again from the rebuilt starting model at resume: a run
    stopped after step 3 (checkpoint at 2) and resumed logs the uninterrupted run's numbers."""
    stage = dict(max_steps=5, checkpoint={"every": 2, "keep_last": 2}, family=family)
    monkeypatch.setenv(ckpt.FAULT_ENV, "enospc:step=3")
    with pytest.raises(OSError):
        train(_stage(data, tmp_path / "stopped", **stage), progress=False)
    monkeypatch.delenv(ckpt.FAULT_ENV)
    train(_stage(data, tmp_path / "stopped", **stage), resume=True, progress=False)
    train(_stage(data, tmp_path / "straight", **stage), progress=False)
    stopped, straight = _records(tmp_path / "stopped"), _records(tmp_path / "straight")
    assert [r["step"] for r in stopped] == [1, 2, 3, 3, 4, 5]
    for a, b in zip(stopped[3:], straight[2:]):
        for k in ("loss", "rewards/margins", "rewards/accuracies"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


class _Rows:
    """A stream of given samples (a custom data stream)."""

    def __init__(self, make):
        self.make, self.bad = make, None

    def take(self, n: int) -> list[dict]:
        return [self.make(i) for i in range(n)]


def test_a_custom_stream_must_give_pairs_the_cache_knows(data, tmp_path):
    plain = lambda i: {"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "images": [], "key": f"k{i}"}  # noqa: E731
    with pytest.raises(ConfigError, match=r"not a preference pair.*format: preference"):
        train(_stage(data, tmp_path / "a", reference="model"), stream_factory=lambda *a: _Rows(plain), progress=False)

    def renamed(stage, processor, rank, world_size):
        real = default_stream(stage, processor, rank, world_size)
        return _Rows(lambda i: {**real.take(1)[0], "pair": "elsewhere.json[0]"})

    with pytest.raises(TrainingError, match=r"'elsewhere.json\[0\]'.*no cached reference.*dpo.reference: model"):
        train(_stage(data, tmp_path / "b", reference="cached"), stream_factory=renamed, progress=False)


@pytest.mark.slow
def test_ddp_and_fsdp_match_a_single_process(data, tmp_path):
    """torchrun with 2 processes (gloo on CPU), DDP with the frozen copy and FSDP2 with the cache: the
    curve of one process with the same global batch (summation order differs: 1e-4 relative). Every
    model family, in one torchrun."""
    stage = {k: v for k, v in _stage(data, tmp_path, max_steps=4).items() if k != "out"}
    own = {f: {k: v for k, v in _stage(data, tmp_path, family=f).items() if k in ("model", "max_length")}
           for f in FAMILIES}
    own["cross_attention"] = {}  # the stage as it is

    def name(strategy: str, family: str) -> str:
        return strategy if family == "cross_attention" else f"{strategy}-{family}"

    stages = []
    for f in FAMILIES:
        stages += [{"name": name("ddp", f), "distributed": {"strategy": "ddp"}, "dpo": {"beta": 0.5, "reference": "model"},
                    **own[f]},
                   {"name": name("fsdp", f), "distributed": {"strategy": "fsdp"},
                    "dpo": {"beta": 0.5, "reference": "cached"}, **own[f]}]
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({**stage, "out": str(tmp_path / "multi"), "stages": stages}))
    train_with_torchrun(config)
    for f in FAMILIES:
        [single] = train({**stage, **own[f], "out": str(tmp_path / f"single-{f}")}, progress=False)
        expected = _records(single.out)
        for strategy in ("ddp", "fsdp"):
            records = _records(tmp_path / "multi" / name(strategy, f))
            assert len(records) == len(expected) == 4
            for a, b in zip(records, expected):
                for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (name(strategy, f), a["step"], k)
            summary = json.loads((tmp_path / "multi" / name(strategy, f) / "summary.json").read_text())
            assert summary["processes"] == 2


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_share_the_prompt_and_score_the_answer_only(data, family):
    _, processor = build_family(family, seed=0)
    mixture = load_mixture(data / "mix.yaml")
    [sample] = MixtureStream(mixture, processor, seed=0).take(1)
    chosen, rejected = sample["chosen"], sample["rejected"]
    start = next(i for i, x in enumerate(chosen["labels"]) if x != IGNORE_INDEX)
    assert chosen["input_ids"][:start] == rejected["input_ids"][:start]  # the shared prompt
    assert processor.image_token_id in chosen["input_ids"][:start]
    tok = processor.tokenizer
    for row, name in ((chosen, "chosen"), (rejected, "rejected")):
        entry = next(e for e in _pairs() if e["id"] == sample["key"])
        scored = [t for t, x in zip(row["input_ids"], row["labels"]) if x != IGNORE_INDEX]
        assert tok.decode(scored, skip_special_tokens=True).strip() == entry[name]
        assert len(row["images"]) == 1


def _parse(entry: dict, root: Path | None = None):
    return parse_preference(LlavaRecord(entry, "f.json[0]"), images_root=root)


def test_prompt_forms_and_earlier_turns(data):
    _, processor = interleaf.build("tiny-random", seed=0)
    root = data / "images"
    plain = _parse({"image": "red.png", "prompt": "<image>\nWhat colour?", "chosen": "red", "rejected": "blue"}, root)
    # TRL's conversational form: typed content parts, answers as one assistant message
    trl = _parse({"images": ["red.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
                  "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}, root)
    a, b = (encode_preference(p, processor, source="s") for p in (plain, trl))
    assert a["chosen"]["input_ids"] == b["chosen"]["input_ids"] and a["rejected"]["labels"] == b["rejected"]["labels"]
    # a multi-turn prompt: its own assistant turn is not scored, only the final answer
    multi = _parse({"image": "red.png", "prompt": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
                                                   {"from": "human", "value": "Sure?"}], "chosen": "yes", "rejected": "no"}, root)
    row = encode_preference(multi, processor, source="s")["chosen"]
    scored = [t for t, x in zip(row["input_ids"], row["labels"]) if x != IGNORE_INDEX]
    assert processor.tokenizer.decode(scored, skip_special_tokens=True).strip() == "yes"
    # JSON lines read the same as a JSON list
    jsonl = data / "prefs.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in _pairs()))
    mixture = load_mixture({"sources": [{"name": "prefs", "format": "preference", "paths": str(jsonl), "images_root": str(root)}]})
    listed = load_mixture(data / "mix.yaml")
    x = MixtureStream(mixture, processor, seed=0).take(3)
    y = MixtureStream(listed, processor, seed=0).take(3)
    assert [s["chosen"]["input_ids"] for s in x] == [s["chosen"]["input_ids"] for s in y]


def test_data_inspect_shows_both_rows_of_a_pair(data):
    from typer.testing import CliRunner

    from interleaf.cli import app

    result = CliRunner().invoke(app, ["data", "inspect", str(data / "prefs.json"), "--images-root", str(data / "images"), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "(preference): 8 samples" in result.output
    assert "chosen: " in result.output and "rejected: " in result.output and "[[red" in result.output


def test_bad_samples_are_skipped_and_counted(data, tmp_path):
    _, processor = interleaf.build("tiny-random", seed=0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    entries = _pairs(4) + [
        {"id": "no-rejected", "image": "red.png", "prompt": "<image>\nWhat colour?", "chosen": "red"},
        {"id": "empty-chosen", "image": "red.png", "prompt": "<image>\nWhat colour?", "chosen": "  ", "rejected": "blue"},
        {"id": "bad-image", "image": str(tmp_path / "broken.png"), "prompt": "<image>\nWhat colour?", "chosen": "red", "rejected": "blue"},
        {"id": "ends-with-answer", "prompt": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "chosen": "a", "rejected": "b"},
        {"id": "user-answer", "prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(entries))
    mixture = load_mixture({"max_bad_fraction": 0.9, "sources": [
        {"name": "p", "format": "preference", "paths": str(path), "images_root": str(data / "images")}]})
    # in file order, as `interleaf data inspect` reads a source
    found = list(iter_source(mixture.sources[0], processor))
    assert [s["key"] for s, _ in found if s is not None] == ["p0", "p1", "p2", "p3"]
    bad = [b for _, b in found if b is not None]
    assert [b.reason for b in bad] == ["malformed_json", "empty_text", "unreadable_image", "malformed_json", "malformed_json"]
    assert "no 'rejected' answer" in bad[0].detail and "must end with a user turn" in bad[3].detail
    assert "'chosen' must be the assistant's answer" in bad[4].detail
    # the training stream skips them and counts them by reason
    stream = MixtureStream(mixture, processor, seed=0, epochs=1)
    assert {s["key"] for s in stream} == {"p0", "p1", "p2", "p3"}
    counted = stream.bad.to_dict()["bad"]["p"]
    assert set(counted) == {"malformed_json", "empty_text", "unreadable_image"} and sum(counted.values()) >= 5


def test_a_file_with_no_usable_pair_is_an_error(data, tmp_path):
    _, processor = interleaf.build("tiny-random", seed=0)
    path = tmp_path / "none.json"
    path.write_text(json.dumps([{k: v for k, v in e.items() if k != "rejected"} for e in _pairs(3)]))
    mixture = load_mixture({"sources": [{"name": "p", "format": "preference", "paths": str(path), "images_root": str(data / "images")}]})
    with pytest.raises(InputError, match=r"not one usable sample.*no 'rejected' answer.*'prompt', 'chosen' and 'rejected'"):
        MixtureStream(mixture, processor, seed=0).take(1)


# --------------------------------------------------------------------------- bad configurations


def test_the_data_flag_gives_a_dpo_stage_a_preference_file(data, tmp_path):
    stage = {k: v for k, v in _stage(data, tmp_path / "run", max_steps=1).items() if k != "data"}
    [result] = train(stage, data=data / "prefs.json", images=data / "images", progress=False)
    assert _records(result.out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert yaml.safe_load((result.out / "config.yaml").read_text())["data"]["sources"][0]["format"] == "preference"


def test_a_dpo_stage_without_a_reference_is_a_config_error(data, tmp_path):
    stage = _stage(data, tmp_path / "run")
    del stage["dpo"]
    with pytest.raises(ConfigError, match=r"'dpo'.*needs a dpo section.*reference: model"):
        load_recipe(stage)
    with pytest.raises(ConfigError, match=r"'dpo.reference'.*needs a reference.*model.*cached"):
        load_recipe({**stage, "dpo": {"beta": 0.1}})
    with pytest.raises(ConfigError, match=r"'dpo.reference'.*expected one of \['model', 'cached'\]"):
        load_recipe({**stage, "dpo": {"reference": "none"}})
    with pytest.raises(ConfigError, match=r"'dpo'.*applies to DPO stages only"):
        load_recipe({**stage, "objective": "lm", "dpo": {"reference": "model"}})
    with pytest.raises(ConfigError, match=r"'z_loss'.*no z-loss"):
        load_recipe({**stage, "dpo": {"reference": "model"}, "z_loss": 1e-4})
    with pytest.raises(ConfigError, match=r"'dpo.label_smoothing'"):
        load_recipe({**stage, "dpo": {"reference": "model", "label_smoothing": 0.7}})
    assert not (tmp_path / "run").exists()


def test_wrong_data_for_the_objective_is_a_config_error(data, tmp_path, synth_corpus):
    corpus = synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)
    llava = {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
                          "images_root": str(corpus / "images")}]}
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].format'.*DPO stage.*'vqa' is 'llava' data.*format: preference"):
        train(_stage(data, tmp_path / "a", data=llava), progress=False)
    lm = {k: v for k, v in _stage(data, tmp_path / "b").items() if k not in ("objective", "dpo")}
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].format'.*preference pairs.*objective: dpo"):
        train(lm, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_packaged_dpo_recipe_runs_by_name(data, tmp_path, family):
    """The recipe's freeze policy (unfreeze_lm) means projector_lm for a token-insertion model."""
    from typer.testing import CliRunner

    import interleaf
    from interleaf.cli import app

    model, processor = build_family(family, seed=0)
    interleaf.save(model, processor, tmp_path / "start")
    result = CliRunner().invoke(app, [
        "train", "dpo", "--model", str(tmp_path / "start"), "--data", str(data / "prefs.json"),
        "--images", str(data / "images"), "--out", str(tmp_path / "run"),
        "max_steps=1", "batch_size=2", f"max_length={64 + (15 if family == 'expand' else 0)}", "log_every=1",
    ])
    assert result.exit_code == 0, result.output
    [record] = _records(tmp_path / "run")
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == its cached reference at step 1
    assert {"rewards/margins", "rewards/accuracies"} <= set(record)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["objective"] == "dpo" and saved["dpo"]["reference"] == "cached"
    assert interleaf.load(tmp_path / "run" / "final")[0].config.freeze == POLICIES[family][0]
