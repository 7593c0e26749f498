"""Captioning metrics: CIDEr-D and BLEU-1..4 through pycocoevalcap, with its PTB tokenisation.

Definitions followed: the COCO caption evaluation (Chen et al. 2015, ``pycocoevalcap``). Captions
are tokenised by Stanford CoreNLP's PTBTokenizer (``-preserveLines -lowerCase``) and punctuation
tokens are dropped, exactly as ``pycocoevalcap.tokenizer.PTBTokenizer`` does; the scores are then
computed by ``pycocoevalcap``'s own ``Cider`` (the CIDEr-D variant of Vedantam et al. 2015:
clipped n-gram counts, Gaussian length penalty, sigma 6, times 10) and ``Bleu(4)`` (closest
reference length for the brevity penalty).

As in pycocoevalcap, brackets come out of the lower-casing tokenizer as ``-lrb-``/``-rrb-`` and
stay (its punctuation list only names the upper-case forms); we keep that so scores match.

CIDEr's IDF weights come from the references being evaluated, so a score on a subset is not
comparable with a score on the full set.

The PTB tokenizer is run here rather than through ``PTBTokenizer.tokenize``, because that method
writes its temporary file inside the installed package directory (read-only installs fail, and
parallel runs share it); we run the same jar with the same options from a private temporary
directory.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from interleaf.errors import InputError, InterleafError

# Tokens pycocoevalcap's PTBTokenizer removes after tokenisation.
PTB_PUNCTUATION: frozenset[str] = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
     "...", ";"}
)  # fmt: skip
_JAR_NAME = "stanford-corenlp-3.4.1.jar"


class JavaNotFoundError(InterleafError, RuntimeError):
    """The PTB tokenizer needs a Java runtime and none was found on PATH."""


def _java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "caption metrics need Java: pycocoevalcap's PTB tokenizer is a Java program and no "
            "'java' executable is on PATH. Install a Java runtime (for example "
            "'apt-get install default-jre-headless', or OpenJDK 11+ from your package manager) "
            "and make sure 'java -version' works."
        )
    return java


def _tokenizer_jar() -> Path:
    try:
        module = importlib.import_module("pycocoevalcap.tokenizer.ptbtokenizer")
    except ModuleNotFoundError as exc:
        raise InterleafError(
            "caption metrics need the 'pycocoevalcap' package: pip install pycocoevalcap"
        ) from exc
    path = Path(str(module.__file__)).parent / _JAR_NAME
    if not path.is_file():
        raise InterleafError(
            f"pycocoevalcap is installed but its tokenizer jar is missing ({path}); reinstall it "
            "with 'pip install --force-reinstall pycocoevalcap'."
        )
    return path


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenise captions as pycocoevalcap does: PTB tokens, lower case, punctuation dropped.

    ``captions`` maps an id to its captions; the result has the same ids, each with its captions
    tokenised and re-joined by single spaces. One Java process handles all of them, started with
    its working directory and input file in a fresh temporary directory (nothing is written into
    the installed package).
    """
    java = _java_executable()
    jar = _tokenizer_jar()
    keys: list[Hashable] = []
    lines: list[str] = []
    for key, caps in captions.items():
        for cap in caps:
            if not isinstance(cap, str):
                raise InputError(f"caption for id {key!r} is {type(cap).__name__}, not a string.")
            keys.append(key)
            lines.append(cap.replace("\n", " "))
    out: dict[Hashable, list[str]] = {key: [] for key in captions}
    if not lines:
        return out
    with tempfile.TemporaryDirectory(prefix="interleaf-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(lines), encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "UTF-8", src.name]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, check=False)
    if proc.returncode != 0:
        raise InterleafError(
            f"the PTB tokenizer failed (exit {proc.returncode}): "
            f"{proc.stderr.decode('utf-8', 'replace').strip()[-500:]}"
        )
    tokenised = proc.stdout.decode("utf-8").split("\n")
    if len(tokenised) < len(lines):
        raise InterleafError(
            f"the PTB tokenizer returned {len(tokenised)} lines for {len(lines)} captions; a "
            "caption may hold a character it splits lines on (form feed, vertical tab)."
        )
    for key, line in zip(keys, tokenised):
        out[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION))
    return out


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float | int | dict[Hashable, float]]:
    """CIDEr-D and BLEU-1..4 of one predicted caption per image against its references.

    Both sides are PTB-tokenised in one Java call (see :func:`ptb_tokenize`), then scored with
    pycocoevalcap's ``Cider().compute_score`` and ``Bleu(4).compute_score``. Returns
    ``{"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "n_images", "CIDEr_per_image"}``; CIDEr is
    on pycocoevalcap's scale (x10, so a strong model scores around 1.0-1.4).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        missing = [k for k in references if k not in predictions][:5]
        extra = [k for k in predictions if k not in references][:5]
        raise InputError(
            "caption_scores: predictions and references must have the same ids; "
            f"missing predictions for {missing}, no references for {extra}."
        )
    if not predictions:
        raise InputError("caption_scores: no captions to score; pass at least one image.")
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise InputError(
                f"caption_scores: references for id {key!r} must be a non-empty list of strings."
            )
    ids = list(references)
    # One tokenizer call for both sides, keyed ("pred", id) and ("ref", id).
    joint: dict[Hashable, Sequence[str]] = {("pred", k): [predictions[k]] for k in ids}
    joint.update({("ref", k): list(references[k]) for k in ids})
    tokens = ptb_tokenize(joint)
    res = {k: tokens[("pred", k)] for k in ids}
    gts = {k: tokens[("ref", k)] for k in ids}
    cider, cider_per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "CIDEr": float(cider),
        **{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)},
        "n_images": len(ids),
        "CIDEr_per_image": {k: float(s) for k, s in zip(ids, cider_per_image)},
    }
