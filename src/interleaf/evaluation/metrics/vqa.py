"""VQA accuracy (VQAv2 protocol) and exact match over short answers.

Definition followed: the VQAv2 evaluation (Antol et al. 2015; Goyal et al. 2017) as implemented in
the official ``vqaEval.py``. A prediction scores, for each of the human answers, ``min(1, matches
among the *other* answers / 3)``; the score is the mean over these leave-one-out subsets.

Normalisation follows that script step by step:

1. Whitespace: ``\\n`` and ``\\t`` become spaces, then the text is stripped. Always applied.
2. Punctuation (``processPunctuation``): each mark of a fixed list is deleted when it touches a
   space in the original text (or when the text holds a digit-comma-digit group), and becomes a
   space otherwise; then periods not followed by a digit are removed (the script's lookbehind is
   mistyped as ``(?!<=\\d)``, which never matches, and it passes ``re.UNICODE`` as the *count*
   argument, so at most 32 periods are removed: both quirks are kept to match its numbers).
3. Digits and articles (``processDigitArticle``): lower case, split on whitespace, number words
   ``none``/``zero``..``ten`` become digits, ``a``/``an``/``the`` are dropped, and apostrophe-less
   contractions are restored (``dont`` -> ``don't``).

Two modes, named in every result:

* ``"official"``: steps 2-3 run on the answers *and* the prediction only when the human answers
  disagree (``len(set(answers)) > 1``). With unanimous answers the comparison is exact after step 1
  (case-sensitive, as in the script; VQAv2 answers are already lower case).
* ``"always"``: steps 1-3 always run, as most harnesses do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from interleaf.errors import InputError

VQAMode = Literal["official", "always"]
VQA_MODES: tuple[str, ...] = ("official", "always")

_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip
# The official pattern, kept verbatim: "(?!<=\d)" is a lookahead for the literal "<=" + digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the script passes re.UNICODE (32) as the count argument

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Apostrophe-less spelling -> canonical contraction, as listed by the VQA evaluation script.
# Entries with upper-case keys can never fire (words are lower-cased first); they are kept for
# fidelity. The odd "somebody'd" -> "somebodyd" entry is the script's too.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip


def _clean_whitespace(text: str) -> str:
    """Step 1: newlines and tabs to spaces, then strip (always applied by the official script)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Step 2, the script's ``processPunctuation``: delete or space out marks, strip periods."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCTUATION:
        # The test looks at the *original* text, the replacement acts on the running output.
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """Step 3, the script's ``processDigitArticle``: lower case, numbers, articles, contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """Normalise a short answer with every step of the VQAv2 evaluation script.

    Whitespace, then punctuation (``processPunctuation``), then number words, articles and
    contractions (``processDigitArticle``); see the module docstring for each rule.

    >>> vqa_normalize("Two dogs.")
    '2 dogs'
    >>> vqa_normalize("dont")
    "don't"
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def _check_mode(mode: str) -> None:
    if mode not in VQA_MODES:
        raise InputError(
            f"VQA accuracy mode {mode!r} is unknown: use 'official' (normalise only when the human "
            "answers disagree, as the VQAv2 script does) or 'always' (normalise every answer)."
        )


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: VQAMode = "official") -> float:
    """VQAv2 accuracy of one prediction against its human answers (usually 10), in [0, 1].

    For each answer i: ``min(1, #{j != i : answers[j] == prediction} / 3)``; the result is the mean
    over i (the leave-one-out average of the official script). ``mode`` chooses when answers are
    normalised: ``"official"`` only if ``len(set(answers)) > 1`` (after whitespace cleaning),
    ``"always"`` every time. See the module docstring for the exact rules.
    """
    _check_mode(mode)
    if isinstance(answers, str) or len(answers) == 0:
        raise InputError(
            f"vqa_accuracy needs a non-empty list of human answers, got {answers!r}: pass the "
            "question's answers as a list of strings (VQAv2 has 10 per question)."
        )
    if not isinstance(prediction, str):
        raise InputError(f"vqa_accuracy: prediction must be a string, got {type(prediction)}.")
    gts = [_clean_whitespace(a) for a in answers]
    pred = _clean_whitespace(prediction)
    if mode == "always" or len(set(gts)) > 1:
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
        pred = _process_digit_article(_process_punctuation(pred))
    matches = [a == pred for a in gts]
    total = sum(matches)
    # Leaving answer i out removes its own match (if any) from the count.
    per_subset = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return sum(per_subset) / len(per_subset)


def vqa_score(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], mode: VQAMode = "official"
) -> dict[str, float | int | str]:
    """Mean VQAv2 accuracy over a set of questions, with the normalisation mode named.

    Returns ``{"vqa_accuracy": mean in [0, 1], "mode": mode, "n": number of questions}``.
    """
    _check_mode(mode)
    if len(predictions) != len(answers):
        raise InputError(
            f"vqa_score: {len(predictions)} predictions but {len(answers)} answer lists; pass "
            "one list of human answers per prediction, in the same order."
        )
    if len(predictions) == 0:
        raise InputError("vqa_score: no predictions to score; pass at least one question.")
    scores = [vqa_accuracy(p, a, mode) for p, a in zip(predictions, answers)]
    return {"vqa_accuracy": sum(scores) / len(scores), "mode": mode, "n": len(scores)}


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 when the prediction equals the reference (or any of several) after ``vqa_normalize``.

    Both sides get the full VQAv2 normalisation (whitespace, punctuation, lower case, number words
    to digits, articles dropped, contractions restored), so ``"Two."`` matches ``"2"``.
    """
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise InputError("exact_match: no reference given; pass a string or a non-empty list.")
    pred = vqa_normalize(prediction)
    return 1.0 if any(pred == vqa_normalize(r) for r in refs) else 0.0
