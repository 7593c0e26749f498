"""Rule-based extraction of a multiple-choice letter from free text, with a failure count.

Definition followed: the rule-based stage of MMBench's answer matching (Liu et al. 2023), which
reads an option letter or an option's text from the model's output before any LLM-based matching;
we never call an LLM, so what the rules cannot read is a parse failure, counted and reported.

Rules, first that yields a valid letter wins:

1. The whole answer is a letter, maybe bracketed or followed by ``.``/``)``/``:`` (``"B"``,
   ``"(b)"``, ``"B."``).
2. The answer starts with a marked letter: ``"(B) cat"``, ``"B. cat"``, ``"b) cat"``, ``"B: cat"``.
3. A cue (``answer``, ``option``, ``choice``, e.g. ``"The answer is B"``, ``"Answer: b) cat"``)
   followed by a letter. A lower-case letter needs a bracket or a following ``)``/``.``/``:``/``,``
   or the end of the text, so ``"the answer is a dog"`` names no letter.
4. Exactly one distinct valid letter appears in brackets anywhere: ``"I pick (C) here"``.
5. Exactly one distinct valid upper-case letter stands alone (``"I think B is right"``). ``A``
   and ``I`` followed by a lower-case word are read as the article and the pronoun, unless that
   word is one that follows a letter (``"A is right"``, ``"A seems correct"``).
6. The option texts: the normalised answer equals one option, or exactly one option's text occurs
   in it as whole words (options contained in another matching option are set aside).

Anything else (no letter, a letter outside the options, several candidates) returns ``None``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from interleaf.errors import InputError

_WHOLE = re.compile(r"^[\(\[]?\s*([A-Za-z])\s*[\)\]\.:,]?$")
_LEADING = re.compile(r"^(?:[\(\[]([A-Za-z])[\)\]]|([A-Za-z])[\)\.:](?=\s|$))")
_CUE = re.compile(
    r"\b(?:answer|option|choice)s?\b(?:\s+is)?\s*[:=]?\s*(?:(?:option|choice)\s*)?"
    r"(?P<open>[\(\[])?(?P<letter>[A-Za-z])(?P<close>[\)\]\.:,])?(?![A-Za-z])",
    re.IGNORECASE,
)
_BRACKETED = re.compile(r"[\(\[]([A-Za-z])[\)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_WORD_AFTER = re.compile(r"\s+([a-z]+)")
# Words that follow an option letter in a sentence, not an article or a pronoun.
_AFTER_LETTER = frozenset(
    {"is", "was", "seems", "looks", "appears", "would", "should", "and", "or", "because", "as"}
)
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def _letters_and_texts(
    options: Sequence[str] | Mapping[str, str] | None, letters: str | Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    if isinstance(options, Mapping):
        texts = {str(k).strip().upper(): str(v) for k, v in options.items()}
    elif options is not None:
        if isinstance(options, str):
            raise InputError("extract_choice: options must be a list of texts, not a string.")
        if len(options) > 26:
            raise InputError(f"extract_choice: {len(options)} options; at most 26 (A-Z) supported.")
        texts = {string.ascii_uppercase[i]: str(t) for i, t in enumerate(options)}
    else:
        texts = {}
    if letters is not None:
        valid = [str(x).strip().upper() for x in letters]
    elif texts:
        valid = list(texts)
    else:
        valid = list("ABCD")
    return valid, texts


def _is_word_not_letter(text: str, end: int, letter: str) -> bool:
    """An ``A``/``I`` followed by a lower-case word (other than "is", "seems", ...) is a word."""
    if letter not in ("A", "I"):
        return False
    m = _WORD_AFTER.match(text, end)
    return m is not None and m.group(1) not in _AFTER_LETTER


def _normalise(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def _match_option_text(text: str, texts: dict[str, str], valid: list[str]) -> str | None:
    norm = _normalise(text)
    opts = {k: _normalise(v) for k, v in texts.items() if k in valid and _normalise(v)}
    exact = [k for k, v in opts.items() if v == norm]
    if len(exact) == 1:
        return exact[0]
    found = [k for k, v in opts.items() if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", norm)]
    # Set aside an option whose text lies inside another found option ("cat" in "black cat").
    found = [k for k in found if not any(k != o and opts[k] in opts[o] for o in found)]
    return found[0] if len(found) == 1 else None


def extract_choice(
    text: str,
    options: Sequence[str] | Mapping[str, str] | None = None,
    letters: str | Sequence[str] | None = None,
) -> str | None:
    """Read the chosen option letter (upper case) from ``text``, or ``None`` if it cannot.

    ``options`` are the option texts, in letter order (A, B, ...) or as ``{letter: text}``; they
    set the valid letters and enable matching by text. ``letters`` overrides the valid letters;
    with neither, ``A``-``D`` are valid. See the module docstring for the rules, in order.
    """
    if not isinstance(text, str):
        raise InputError(f"extract_choice: text must be a string, got {type(text).__name__}.")
    valid, texts = _letters_and_texts(options, letters)
    t = text.strip()
    if not t:
        return None

    m = _WHOLE.match(t)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()

    m = _LEADING.match(t)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter

    for m in _CUE.finditer(t):
        letter = m.group("letter")
        if letter.upper() not in valid:
            continue
        if m.group("open"):
            return letter.upper()
        if letter.islower() and not m.group("close") and m.end() != len(t):
            continue
        return letter.upper()

    bracketed = {x.upper() for x in _BRACKETED.findall(t)} & set(valid)
    if len(bracketed) == 1:
        return bracketed.pop()

    standalone = {
        m.group(1)
        for m in _STANDALONE.finditer(t)
        if m.group(1) in valid and not _is_word_not_letter(t, m.end(), m.group(1))
    }
    if len(standalone) == 1:
        return standalone.pop()

    if texts:
        return _match_option_text(t, texts, valid)
    return None


@dataclass
class ChoiceExtractor:
    """Calls :func:`extract_choice` and counts parse failures, which results must report.

    >>> ex = ChoiceExtractor()
    >>> ex("The answer is B"), ex("no idea")
    ('B', None)
    >>> ex.summary()["failure_rate"]
    0.5
    """

    total: int = 0
    failures: int = 0

    def __call__(
        self,
        text: str,
        options: Sequence[str] | Mapping[str, str] | None = None,
        letters: str | Sequence[str] | None = None,
    ) -> str | None:
        letter = extract_choice(text, options, letters)
        self.total += 1
        self.failures += letter is None
        return letter

    @property
    def failure_rate(self) -> float:
        """Fraction of answers no letter could be read from (0.0 before any call)."""
        return self.failures / self.total if self.total else 0.0

    def summary(self) -> dict[str, float | int]:
        """``{"n_answers", "n_parse_failures", "failure_rate"}`` for a results file."""
        return {
            "n_answers": self.total,
            "n_parse_failures": self.failures,
            "failure_rate": self.failure_rate,
        }
