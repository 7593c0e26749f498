"""Tests for interleaf.evaluation.metrics, each against a brute-force or library reference."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from interleaf.errors import InputError
from interleaf.evaluation import (
    ChoiceExtractor,
    CircularRecord,
    JavaNotFoundError,
    MMERecord,
    caption_scores,
    circular_eval,
    circular_rotations,
    exact_match,
    extract_choice,
    index_to_letter,
    mme_parse_yes_no,
    mme_scores,
    ptb_tokenize,
    roc_auc,
    topk_accuracy,
    vqa_accuracy,
    vqa_normalize,
    vqa_score,
)

# ----------------------------------------------------------------------------------------- VQA


def brute_force_vqa(pred: str, answers: list[str]) -> float:
    """Mean over the 10 leave-one-out subsets of min(1, matches in the subset / 3)."""
    accs = []
    for i in range(len(answers)):
        subset = answers[:i] + answers[i + 1 :]
        accs.append(min(1.0, sum(a == pred for a in subset) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("hello, world", "hello world"),  # mark touching a space is deleted
        ("black-and-white", "black and white"),  # mark inside a word becomes a space
        ("1,000", "1000"),  # digit,digit: every mark deleted
        ("3.5", "3.5"),  # period before a digit kept
        ("yes.", "yes"),  # other periods removed
        ("yes!", "yes"),
        ('"quoted"', "quoted"),
        ("YES", "yes"),  # lower case
        ("two", "2"),  # number words to digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("the cat", "cat"),  # articles dropped
        ("a an the dog", "dog"),
        ("dont", "don't"),  # contractions restored
        ("isnt", "isn't"),
        ("cant see", "can't see"),
        ("\n  left\tside ", "left side"),  # whitespace
    ],
)
def test_vqa_normalize_rules(raw: str, expected: str) -> None:
    assert vqa_normalize(raw) == expected


def test_vqa_unanimous_answers() -> None:
    answers = ["yes"] * 10
    assert vqa_accuracy("yes", answers) == pytest.approx(brute_force_vqa("yes", answers))
    assert vqa_accuracy("yes", answers) == pytest.approx(1.0)
    assert vqa_accuracy("no", answers, mode="always") == 0.0
    # Unanimous answers: the official script does not normalise, "always" does.
    assert vqa_accuracy("Yes.", answers, mode="official") == 0.0
    assert vqa_accuracy("Yes.", answers, mode="always") == pytest.approx(1.0)
    assert vqa_accuracy("2", ["two"] * 10, mode="official") == 0.0
    assert vqa_accuracy("2", ["two"] * 10, mode="always") == pytest.approx(1.0)
    # Whitespace is always cleaned, in both modes.
    assert vqa_accuracy(" yes\n", answers, mode="official") == pytest.approx(1.0)


def test_vqa_split_answers_brute_force() -> None:
    answers = ["red"] * 2 + ["blue"] * 8
    got = vqa_accuracy("red", answers)
    assert got == pytest.approx(brute_force_vqa("red", answers))
    assert got == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # = 0.6
    # Split answers with spellings that differ: both modes normalise, so "two"/"2" agree.
    answers = ["two", "two", "2"] + ["3"] * 7
    normalised = ["2", "2", "2"] + ["3"] * 7
    for mode in ("official", "always"):
        assert vqa_accuracy("2", answers, mode=mode) == pytest.approx(
            brute_force_vqa("2", normalised)
        )
        assert vqa_accuracy("Two.", answers, mode=mode) == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    vocab = ["cat", "dog", "the cat", "Cat.", "two", "2"]
    for _ in range(50):
        answers = [str(x) for x in rng.choice(vocab, size=10)]
        pred = str(rng.choice(vocab))
        norm = [vqa_normalize(a) for a in answers]
        assert vqa_accuracy(pred, answers, mode="always") == pytest.approx(
            brute_force_vqa(vqa_normalize(pred), norm)
        )


def test_vqa_score_names_mode_and_rejects_bad_input() -> None:
    result = vqa_score(["yes", "2"], [["yes"] * 10, ["two"] * 10], mode="always")
    assert result == {"vqa_accuracy": pytest.approx(1.0), "mode": "always", "n": 2}
    official = vqa_score(["yes", "2"], [["yes"] * 10, ["two"] * 10])
    assert official["mode"] == "official" and official["vqa_accuracy"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="mode"):
        vqa_accuracy("yes", ["yes"], mode="loose")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="non-empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(InputError, match="same order"):
        vqa_score(["a"], [])


def test_exact_match() -> None:
    assert exact_match("Two.", "2") == 1.0
    assert exact_match("The dog", "dog") == 1.0
    assert exact_match("dont", "don't") == 1.0
    assert exact_match("cat", "dog") == 0.0
    assert exact_match("cat", ["dog", "a cat"]) == 1.0


# ---------------------------------------------------------------------------------- captioning

PREDICTIONS = {
    1: "A man riding a horse on a beach.",
    2: "Two dogs playing with a red ball in the grass",
    3: "a plate of food with broccoli and rice",
    4: "A red bus driving down a city street.",
    5: "a cat sitting on top of a laptop",
    6: "people standing in a kitchen",
}
REFERENCES = {
    1: ["A man rides a horse along the beach.", "Person on horseback at the shore.",
        "A rider and his horse on the sand."],
    2: ["Two dogs play with a ball on the lawn.", "Dogs chase a red ball across grass.",
        "A pair of puppies playing in a yard.", "Two dogs fight over a toy."],
    3: ["A plate with broccoli, rice and chicken.", "Food on a white plate.",
        "A healthy meal of rice and vegetables.", "Broccoli and rice served on a dish.",
        "A dinner plate full of food."],
    4: ["A red double-decker bus on a street.", "A bus drives through the city.",
        "The red bus is going down the road."],
    5: ["A cat lying on a laptop keyboard.", "A kitten sits on an open laptop.",
        "Cat on top of a computer.", "A cat sleeping on a notebook computer."],
    6: ["Several people in a kitchen.", "A group of people cooking together.",
        "Friends standing around a kitchen counter."],
}  # fmt: skip


def _package_files() -> set[str]:
    from pycocoevalcap.tokenizer import ptbtokenizer

    root = Path(ptbtokenizer.__file__).parent.parent  # the installed pycocoevalcap directory
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def caption_run() -> dict:
    before = _package_files()
    scores = caption_scores(PREDICTIONS, REFERENCES)
    # One more tokenizer call: the same corpus, plus a sentence checked by hand.
    joint = {("pred", k): [v] for k, v in PREDICTIONS.items()}
    joint.update({("ref", k): v for k, v in REFERENCES.items()})
    joint["hand"] = ['A man, riding a "horse" (fast)...', "Don't stop!"]
    tokens = ptb_tokenize(joint)
    after = _package_files()
    return {"scores": scores, "tokens": tokens, "before": before, "after": after}


def test_caption_scores_equal_pycocoevalcap(caption_run: dict) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    tokens = caption_run["tokens"]
    res = {k: tokens[("pred", k)] for k in PREDICTIONS}
    gts = {k: tokens[("ref", k)] for k in PREDICTIONS}
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = caption_run["scores"]
    assert scores["CIDEr"] == pytest.approx(cider, rel=1e-12)
    for n in range(4):
        assert scores[f"BLEU-{n + 1}"] == pytest.approx(bleu[n], rel=1e-12)
    assert scores["n_images"] == 6
    assert list(scores["CIDEr_per_image"].values()) == pytest.approx(list(per_image))
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1 and scores["CIDEr"] > 0


def test_ptb_tokenization_lowercases_and_drops_punctuation(caption_run: dict) -> None:
    hand = caption_run["tokens"]["hand"]
    # Brackets come out lower-cased as -lrb-/-rrb-, which pycocoevalcap's punctuation list (upper
    # case) does not remove: kept, so scores match pycocoevalcap's.
    assert hand == ["a man riding a horse -lrb- fast -rrb-", "do n't stop"]
    assert caption_run["tokens"][("pred", 1)] == ["a man riding a horse on a beach"]


def test_caption_scores_write_nothing_into_the_package(caption_run: dict) -> None:
    assert caption_run["after"] == caption_run["before"]


def test_caption_scores_validate_input() -> None:
    with pytest.raises(InputError, match="same ids"):
        caption_scores({1: "a"}, {2: ["b"]})
    with pytest.raises(InputError, match="non-empty list"):
        caption_scores({1: "a"}, {1: []})


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(JavaNotFoundError, match="Install a Java runtime"):
        ptb_tokenize({1: ["a caption"]})


# ------------------------------------------------------------------------------ classification


def test_roc_auc_equals_ordered_pair_fraction() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=40)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    pairs = [1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)]
    assert roc_auc(labels, scores) == pytest.approx(sum(pairs) / len(pairs))
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    with pytest.raises(InputError, match="one positive and one negative"):
        roc_auc([1, 1], [0.2, 0.3])


def test_topk_accuracy_brute_force() -> None:
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, size=(30, 6)).astype(float)  # ties on purpose
    labels = rng.integers(0, 6, size=30)
    for k in (1, 2, 3, 6):
        hits = 0
        for row, y in zip(scores, labels):
            ranked = sorted(range(6), key=lambda j: (-row[j], j))  # ties: lower index first
            hits += int(y in ranked[:k])
        assert topk_accuracy(scores, labels, k) == pytest.approx(hits / 30)
    assert topk_accuracy(scores, labels, 6) == 1.0
    with pytest.raises(InputError, match="k=7"):
        topk_accuracy(scores, labels, 7)


# ----------------------------------------------------------------------------------------- MME


def test_mme_yes_no_parsing() -> None:
    assert mme_parse_yes_no("Yes") == "yes"
    assert mme_parse_yes_no("No, there is not.") == "no"
    assert mme_parse_yes_no(" yes, it is") == "yes"
    assert mme_parse_yes_no("I don't know") == "other"
    assert mme_parse_yes_no("There is a dog") == "other"


def test_mme_scores_on_a_tiny_set() -> None:
    def rec(image: str, subtask: str, pred: str, ans: str) -> MMERecord:
        return MMERecord(image, subtask, pred, ans)

    records = [
        # existence: img e1 both right, e2 one wrong -> acc 3/4, acc+ 1/2
        rec("e1", "existence", "Yes", "yes"), rec("e1", "existence", "No.", "no"),
        rec("e2", "existence", "yes, there is", "yes"), rec("e2", "existence", "Yes", "no"),
        # OCR (name matched case-insensitively): e3 right, e4 "other" wrong -> acc 3/4, acc+ 1/2
        rec("o1", "ocr", "yes", "yes"), rec("o1", "ocr", "no", "no"),
        rec("o2", "ocr", "I cannot tell", "yes"), rec("o2", "ocr", "no", "no"),
        # count: everything wrong -> 0
        rec("c1", "count", "no", "yes"), rec("c1", "count", "yes", "no"),
        # code_reasoning (cognition): all right -> 200
        rec("k1", "code_reasoning", "YES", "yes"), rec("k1", "code_reasoning", "no", "no"),
    ]  # fmt: skip
    out = mme_scores(records)
    sub = out["subtasks"]
    assert sub["existence"]["accuracy"] == pytest.approx(3 / 4)
    assert sub["existence"]["accuracy_plus"] == pytest.approx(1 / 2)
    assert sub["existence"]["score"] == pytest.approx(100 * (3 / 4 + 1 / 2))
    assert sub["OCR"]["score"] == pytest.approx(100 * (3 / 4 + 1 / 2))
    assert sub["OCR"]["n_other"] == 1
    assert sub["count"]["score"] == 0.0
    assert sub["code_reasoning"]["score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(2 * 125.0)
    assert out["cognition"] == pytest.approx(200.0)
    assert out["perception_max"] == 2000 and out["cognition_max"] == 800
    assert "scene" in out["missing_subtasks"] and "OCR" not in out["missing_subtasks"]
    # Dict records work as well; unpaired images are refused unless asked for.
    as_dicts = [{"image_id": "x", "subtask": "scene", "prediction": "yes", "answer": "yes"}]
    with pytest.raises(InputError, match="exactly two questions"):
        mme_scores(as_dicts)
    assert mme_scores(as_dicts, require_pairs=False)["subtasks"]["scene"]["score"] == 200.0
    with pytest.raises(InputError, match="unknown"):
        mme_scores([rec("z", "vibes", "yes", "yes")])


# ------------------------------------------------------------------------------------- MMBench


def test_circular_rotations() -> None:
    options = ["cat", "dog", "cow", "owl"]
    rotations = circular_rotations(options, 2)
    assert len(rotations) == 4
    assert rotations[0] == (options, 2)
    assert {r[0][0] for r in rotations} == set(options)  # every option leads once
    for rotated, idx in rotations:
        assert sorted(rotated) == sorted(options)
        assert rotated[idx] == "cow"
    with pytest.raises(InputError):
        circular_rotations(options, 4)


def test_circular_eval_against_vanilla() -> None:
    questions = {
        "q0": (["cat", "dog", "cow", "owl"], 1),  # model knows it: right in every rotation
        "q1": (["red", "blue", "green", "pink"], 0),  # model always says "A": right once
        "q2": (["one", "two", "three", "four"], 3),  # model right in rotations 0 and 1 only
    }
    records = []
    for q, (options, answer) in questions.items():
        for r, (rotated, idx) in enumerate(circular_rotations(options, answer)):
            if q == "q0":
                pred = index_to_letter(rotated.index(options[answer]))
            elif q == "q1":
                pred = "A"
            else:
                pred = index_to_letter(idx) if r < 2 else None  # None: no letter parsed
            records.append(CircularRecord(q, r, pred, index_to_letter(idx)))
    out = circular_eval(records)
    assert out["circular_accuracy"] == pytest.approx(1 / 3)
    assert out["vanilla_accuracy"] == pytest.approx(1.0)
    assert out["all_rotations_accuracy"] == pytest.approx((4 + 1 + 2) / 12)
    assert out["n_questions"] == 3 and out["n_records"] == 12
    assert "rotation 0" in out["vanilla"]
    with pytest.raises(InputError, match="twice"):
        circular_eval(records + [records[0]])
    with pytest.raises(InputError, match="rotation 0"):
        circular_eval(records[1:])


# --------------------------------------------------------------------------- answer extraction

OPTIONS = ["dog", "cat", "black cat", "cow"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b)", "B"),
        ("[c]", "C"),
        ("The answer is B", "B"),
        ("Answer: b) cat", "B"),
        ("The correct answer is (D) cow.", "D"),
        ("Option A is correct", "A"),
        ("I think B is right", "B"),
        ("A is right", "A"),
        ("I pick (C) here", "C"),
        ("cat", "B"),  # option text, no letter
        ("It is a cat", "B"),
        ("a black cat", "C"),  # "cat" lies inside "black cat"
        ("The answer is a dog", "A"),  # "a" is an article, "dog" names option A
        ("E", None),  # not an option
        ("dog or cow", None),  # ambiguous
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_without_options_and_failure_rate() -> None:
    assert extract_choice("The answer is C") == "C"
    assert extract_choice("The answer is F") is None  # default letters A-D
    assert extract_choice("The answer is F", letters="ABCDEF") == "F"
    assert extract_choice("B) blue", {"A": "red", "B": "blue"}) == "B"
    extractor = ChoiceExtractor()
    answers = ["A", "(B) dog", "no idea", "The answer is C", "maybe E"]
    letters = [extractor(a) for a in answers]
    assert letters == ["A", "B", None, "C", None]
    assert extractor.summary() == {
        "n_answers": 5,
        "n_parse_failures": 2,
        "failure_rate": pytest.approx(2 / 5),
    }
