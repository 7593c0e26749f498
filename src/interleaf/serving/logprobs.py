"""Log-probabilities of the generated tokens, in OpenAI's ``logprobs`` shape.

What is reported: the log-softmax of the logits the *model* gives at each step, before temperature
and top_p (the model's own distribution, as OpenAI reports it), for the chosen token and, when
``top_logprobs`` asks, the ``k`` most likely tokens (sorted, most likely first). A probability of
zero is reported as ``-9999.0``, OpenAI's value for "very unlikely".

How: when a row of the running batch asked for them, the batcher takes the log-softmax ``(B, V)`` of
each step's logits (float32) and reads that row's entry from it; temperature and top_p act only on the
choice of the token (:mod:`~interleaf.serving.sampling`), so an answer is the same with or without
``logprobs``.

Each entry is ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``;
``bytes`` are the token's own bytes (a byte-level BPE token that holds part of a character gives
that part, and its ``token`` writes the bytes it cannot decode as ``\\xNN``).
"""

from __future__ import annotations

import math
import re

import torch

VERY_UNLIKELY = -9999.0
MAX_TOP_LOGPROBS = 20
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte value (GPT-2's convention): the printable
    Latin-1 bytes stand for themselves, every other byte for chr(256 + its rank among those)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()


class TokenTexts:
    """Each token id's text and bytes as OpenAI reports them (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel" or hasattr(tokenizer, "byte_decoder")
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            self._cache[token_id] = self._text(token_id)
        return self._cache[token_id]

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        raw: bytes | None = None
        if isinstance(piece, str):
            if self.byte_level and piece and all(c in _BYTE_LEVEL for c in piece):
                raw = bytes(_BYTE_LEVEL[c] for c in piece)
            elif (match := _BYTE_TOKEN.match(piece)) is not None:
                raw = bytes([int(match.group(1), 16)])
        if raw is None:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else VERY_UNLIKELY


def entry(logprobs: torch.Tensor, token_id: int, top: int, texts: TokenTexts) -> dict:
    """OpenAI's entry for ``token_id`` chosen from one row's log-probabilities ``logprobs`` (V,),
    with its ``top`` most likely alternatives."""
    text, raw = texts(token_id)
    out = {"token": text, "logprob": _value(float(logprobs[token_id])), "bytes": raw, "top_logprobs": []}
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        for value, alt in zip(values.tolist(), ids.tolist()):
            alt_text, alt_raw = texts(alt)
            out["top_logprobs"].append({"token": alt_text, "logprob": _value(value), "bytes": alt_raw})
    return out


def choice_logprobs(entries: list[dict] | None) -> dict | None:
    """A choice's (or a chunk's) ``logprobs`` object: None when the request did not ask."""
    return None if entries is None else {"content": entries, "refusal": None}
