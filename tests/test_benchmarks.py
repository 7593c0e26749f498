"""The benchmark scripts run: each in its smallest mode (``--smoke``, ``--dry-run``), in seconds.

Each prints its dated header (date, machine, commit, the exact command) and its tables; the greedy
generations of interleaf and the reference it is compared with (transformers' IDEFICS and LLaVA,
the plain LM it wraps) are the same tokens, and the server's greedy answers under concurrent load
are batched ``generate``'s. The timings themselves are not checked.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_dated_header(text: str, command: str) -> None:
    assert f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}" in text
    assert "- machine: " in text and "load average" in text
    assert "- commit: " in text
    assert f"- command: `python benchmarks/{command}`" in text


def assert_filled(rows) -> None:
    assert rows
    for row in rows:
        assert math.isfinite(row.reference) and row.reference > 0, row
        assert math.isfinite(row.ours) and row.ours > 0, row


def test_vs_transformers_smoke_matches_idefics_and_llava_token_for_token():
    out = script("vs_transformers").main(["--smoke", "--threads", "1"])
    assert set(out) == {"idefics", "llava"}
    for family, reference in (("idefics", "transformers IDEFICS"), ("llava", "transformers LlavaForConditionalGeneration")):
        result = out[family]
        assert result["mismatches"] == [], family
        assert result["parameters"][0] == result["parameters"][1] and result["trainable"][0] == result["trainable"][1]
        cases = [row.case for row in result["rows"]]
        assert cases == [
            "prefill, batch 8, 4 images", "generate, batch 1, 1 image", "generate, batch 1, 4 images",
            "generate, batch 8, 1 image", "generate, batch 8, 4 images", "train step, batch 8, 1-4 images",
            "peak memory, generate batch 8, 4 images", "peak memory, train step",
        ]
        assert_filled(result["rows"][:6])  # peak memory above the fork may round to 0 on tiny models
        text = result["text"]
        assert_dated_header(text, "vs_transformers.py --smoke --threads 1")
        assert f"| case | {reference} | interleaf | ratio | target |" in text
        assert "identical greedy generations: yes" in text


def test_vs_plain_lm_smoke_holds_the_plain_lm_and_writes_the_results_file(tmp_path):
    module = script("vs_plain_lm")
    out = module.main(["--smoke", "--threads", "1", "--results", str(tmp_path)])
    assert out["mismatches"] == []
    assert [row.case.split(",")[0] for row in out["rows"]] == ["cross-attention every 4 layers"] * 2 + ["token insertion"] * 2
    assert_filled(out["rows"])
    assert all(row.unit == "decode tokens/s" and row.higher_is_better for row in out["rows"])
    assert "| case | plain LM | interleaf | ratio | target |" in out["text"]
    assert "greedy tokens where the image cannot matter: identical" in out["text"]
    written = list(tmp_path.glob("*.md"))
    assert [p.name for p in written] == [f"{module.benchlib.machine_slug()}-"
                                         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.md"]
    assert out["text"] in written[0].read_text()


def test_gpu_dry_run_prints_every_table_on_cpu():
    out = script("gpu").main(["--dry-run"])
    assert out["same"] is True
    (trained,), (decoded,) = out["trained"], out["decoded"]
    assert trained["shape"] == decoded["shape"] == "dry"
    assert trained["tflop"] > 0 and trained["step"] > 0 and trained["mfu"] is None  # no peak known for a CPU
    assert decoded["read"] > 0 and decoded["rate"] > 0
    assert_filled(out["rows"])
    text = out["text"]
    assert_dated_header(text, "gpu.py --dry-run")
    for heading in ("| training (FSDP2, checkpointing) |", "| decoding, batch 1, 1 image |", "| case | transformers |"):
        assert heading in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_gpu_without_a_gpu_asks_for_the_dry_run(capsys):
    with pytest.raises(SystemExit):
        script("gpu").main([])
    assert "--dry-run" in capsys.readouterr().err


def test_a_missed_target_says_by_how_much():
    from_lib = script("benchlib")
    slower = from_lib.Row("decode", 100.0, 60.0, "tokens/s", higher_is_better=True, target=0.8)
    assert slower.ratio == pytest.approx(0.6)
    assert slower.verdict() == ">= 0.80x: missed by 25 %"
    faster = from_lib.Row("train step", 2.0, 1.0, "s", target=1.3)
    assert faster.ratio == pytest.approx(2.0) and faster.verdict() == ">= 1.30x: met"


@pytest.mark.parametrize("family", ["cross_attention", "token_insertion"])
def test_serve_smoke_answers_as_batched_generate_and_prints_every_figure(family, tmp_path):
    module = script("serve")
    argv = ["--smoke", "--family", family, "--requests", "3", "--clients", "2", "--gap", "0.01", "--threads", "1",
            "--results", str(tmp_path)]
    out = module.main(argv)
    assert out["failed"] == [] and out["matched"] == 3  # text only, 1 image, 2 images: each the ceiling's answer
    assert out["server_tokens"] == out["ceiling_tokens"] > 0
    assert [row.case for row in out["rows"]] == ["completion tokens", "requests"]
    assert_filled(out["rows"])
    assert all(row.higher_is_better for row in out["rows"])
    assert set(out["figures"]) == {"request latency", "time to first token"}
    for p50, p95 in out["figures"].values():
        assert 0 < p50 <= p95 and math.isfinite(p95)
    text = out["text"]
    assert_dated_header(text, "serve.py " + " ".join(argv))
    assert "| case | generate ceiling | server | ratio | target |" in text
    assert "| request latency (s) |" in text and "| time to first token (s) |" in text
    assert "server answers equal to the ceiling's: 3/3" in text
    assert out["text"] in next(tmp_path.glob("*.md")).read_text()
