"""The prompt format: how each model family writes images and turns, and how a row is cut.

Inference (:class:`~interleaf.processing.InterleafProcessor`) and training
(:mod:`interleaf.data.tokenize`) both write their token rows through one :class:`PromptFormat`,
so a model is trained on exactly the spelling it is prompted with.

Images, by family (``tokens.prompt_format``):

- ``"openflamingo"``: an image is ``<image>``; in a chat conversation (InfiMM style)
  ``<|endofchunk|><image>``. In training documents (MMC4) ``<|endofchunk|>`` also closes the text
  chunk that follows each image (:attr:`PromptFormat.closes_chunks`).
- ``"llava"`` (token insertion, ``expand`` placement): an image is ``<image>`` written once per
  vision token the model puts there (:meth:`PromptFormat.image_token_count`, the one place a
  per-image count is decided: the fixed ``tokens.image_seq_length``, or with LLaVA-NeXT's
  any-resolution tiling (``anyres``, convention ``llava_next``) the count of that image's size,
  :func:`interleaf.processing.anyres.num_image_tokens`). With ``image_seq_length`` 1 it is one
  ``<image>`` per image, which the model grows (``replace``). xGen-MM's instruct convention
  (``anyres`` convention ``xgenmm``, placement ``replace``) is that: one ``<image>`` per image, and
  in a chat conversation ``"<image> "`` (the token and a space), as the instruct checkpoints are
  prompted; the image's length in the LM's sequence follows from its size
  (:attr:`PromptFormat.xgenmm_images`).
- ``"idefics"``: an image is ``<fake_token_around_image><image><fake_token_around_image>``;
  consecutive images share the fake token between them (``<fake><image><fake><image><fake>``), as
  transformers' ``IdeficsProcessor`` writes them. Plain-prompt text is stripped of spaces at both
  ends, with ``<end_of_utterance>`` between consecutive texts when asked; after an EOS the image
  mask is reset until the next image (chat conversations excepted).

Turns: a chat conversation goes through the tokenizer's chat template, images in the place their
part had in the message, written as above. A template that loops over the content parts and writes
``<image>`` for each image part itself (transformers' LLaVA processors' templates) gets list content,
and each ``<image>`` it writes is one image written as above
(:func:`interleaf.processing.prompts.template_wants_parts`).

Image spans (:meth:`PromptFormat.image_spans`): ``[start, end)`` of the tokens the format writes
for one image: ``<image>``, with the ``<|endofchunk|>`` before it in a chat conversation, and for
IDEFICS both fake tokens, for LLaVA its run of ``<image>`` tokens (consecutive images' runs are told
apart by their length; under anyres the lengths differ per image, so the span functions take
``counts``, each image's token count in order, from whoever wrote the row). A fake token shared by two consecutive IDEFICS images belongs to both
spans (they overlap by that token): a row cut right after the first image ends
``<fake><image><fake>``, and a row cut right before the second starts ``<fake><image><fake>``,
which is what ``IdeficsProcessor`` writes for either image alone. An ``<|endofchunk|>`` before an
image in a plain prompt or a document closes the previous chunk; it is no part of the image.

Truncation (:meth:`PromptFormat.cut_right`, :meth:`PromptFormat.cut_left`) never splits an image:
a cut may fall inside a span only where it ends that span (keeping the start of a row) or starts
it (keeping the end); otherwise the cut moves so that the whole image goes.

Labels: :data:`IGNORE_INDEX` marks a token the loss skips.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import AnyresConfig, TokensConfig
from ..errors import ConfigError, InputError
from . import anyres as anyres_tiling

IGNORE_INDEX = -100  # a label the loss skips (PyTorch's cross-entropy default)


def uses_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token first when asked for special tokens."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


class PromptFormat:
    """One family's prompt format, with its special tokens resolved against ``tokenizer``.

    The tokens of ``tokens.required_tokens()`` must each be one token of ``tokenizer`` (the model
    builder adds them); otherwise :class:`~interleaf.errors.ConfigError` says how to add them.
    ``anyres`` is the model's any-resolution tiling (``insertion.anyres``), if any.
    """

    def __init__(self, tokenizer, tokens: TokensConfig, anyres: AnyresConfig | None = None):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.anyres = anyres
        self.ids = {tok: self._single_token_id(tok) for tok in tokens.required_tokens()}

    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(
                "tokens",
                f"{token!r} is not a single token of the tokenizer (it splits into {len(ids)} ids)",
                f"add it first: tokenizer.add_special_tokens({{'additional_special_tokens': {self.tokens.required_tokens()!r}}})",
            )
        return ids[0]

    # -- the family's tokens --
    @property
    def is_idefics(self) -> bool:
        return self.tokens.prompt_format == "idefics"

    @property
    def is_llava(self) -> bool:
        return self.tokens.prompt_format == "llava"

    @property
    def xgenmm_images(self) -> bool:
        """Whether images are tiled the xGen-MM way: one ``<image>`` each, grown by the model to its size's length."""
        return self.is_llava and self.anyres is not None and self.anyres.convention == "xgenmm"

    @property
    def tiled_images(self) -> bool:
        """Whether images are tiled into views (any-resolution, either convention)."""
        return self.is_llava and self.anyres is not None

    @property
    def sized_images(self) -> bool:
        """Whether an image's token count depends on its size (``llava`` format with LLaVA-NeXT tiling)."""
        return self.is_llava and self.anyres is not None and self.anyres.convention == "llava_next"

    def image_token_count(self, image: object = None) -> int:
        """How many ``<image>`` tokens one image is written as: the one place this is decided.

        ``image`` is the image being written (or ``None`` where it is not at hand); every image
        takes ``tokens.image_seq_length`` tokens in the ``llava`` format and one token elsewhere.
        With LLaVA-NeXT tiling (:attr:`sized_images`) the count is that of the image's size:
        ``image`` is then anything with a ``size`` (width, height), such as a PIL image, or the pair
        itself; its ``where`` attribute, if any, names it in errors (too small, too large).
        """
        if not self.sized_images:
            return self.tokens.image_seq_length if self.is_llava else 1
        if image is None:
            raise InputError("under LLaVA-NeXT tiling an image's token count depends on its size; pass the image "
                             "(or its (width, height)) to image_token_count")
        size = image if isinstance(image, (tuple, list)) else getattr(image, "size", None)
        if size is None:
            raise InputError(f"cannot tell the size of {type(image).__name__} to count its image tokens; pass a "
                             "PIL image or a (width, height) pair")
        return anyres_tiling.num_image_tokens(size, self.anyres, where=getattr(image, "where", "image"))

    @property
    def grows_images(self) -> bool:
        """Whether the model replaces each image's one ``<image>`` token by more positions
        (placement ``replace``: ``tokens.image_lm_length`` is set)."""
        return self.tokens.image_lm_length is not None

    @property
    def lm_sized_images(self) -> bool:
        """Whether an image's length in the LM's sequence depends on its size: :attr:`sized_images`, or a
        grown image under xGen-MM's any-resolution tiling ((1 + N crops) views of ``image_lm_length``)."""
        return self.sized_images or (self.grows_images and self.anyres is not None and self.anyres.convention == "xgenmm")

    def lm_token_count(self, image: object = None) -> int:
        """How many positions one image takes in the sequence the LM sees.

        :meth:`image_token_count` when the text holds them all; under placement ``replace``
        ``tokens.image_lm_length`` (with xGen-MM's tiling, that many per view of the image's size,
        :func:`interleaf.processing.anyres.num_image_tokens`; ``image`` as for :meth:`image_token_count`).
        """
        grown = self.tokens.image_lm_length
        if grown is None:
            return self.image_token_count(image)
        if not self.lm_sized_images:
            return grown
        size = image if isinstance(image, (tuple, list)) else getattr(image, "size", None)
        if size is None:
            raise InputError("under xGen-MM's tiling an image's length depends on its size; pass the image "
                             "(or its (width, height)) to lm_token_count")
        return anyres_tiling.num_image_tokens(size, self.anyres, grown, where=getattr(image, "where", "image"))

    @property
    def closes_chunks(self) -> bool:
        """Whether training documents close each image's text chunk with ``<|endofchunk|>``."""
        return self.tokens.prompt_format == "openflamingo"

    @property
    def image_token_id(self) -> int:
        return self.ids[self.tokens.image_token]

    @property
    def fake_image_token_id(self) -> int | None:
        return self.ids.get(self.tokens.fake_image_token)

    @property
    def end_of_chunk_token_id(self) -> int | None:
        return self.ids.get(self.tokens.end_of_chunk_token)

    def literal_tokens(self) -> list[str]:
        """Token strings a user's text may not hold: only the format writes them."""
        return [self.tokens.image_token, self.tokens.fake_image_token] if self.is_idefics else [self.tokens.image_token]

    def resets_image_after_eos(self, chat: bool) -> bool:
        """Whether a token after an EOS sees no image until the next one (IDEFICS' packed inputs)."""
        return self.is_idefics and not chat

    # -- spelling --
    def image_text(self, last_was_image: bool, chat: bool, image: object = None) -> str:
        """The text of one image; ``last_was_image``: the token before it ends another image."""
        t = self.tokens
        if self.xgenmm_images and chat:
            return t.image_token + " "  # xGen-MM's instruct prompts: "<image> " per image
        if self.is_llava:
            return t.image_token * self.image_token_count(image)
        if self.is_idefics:
            fake = t.fake_image_token
            return t.image_token + fake if last_was_image else fake + t.image_token + fake
        return t.end_of_chunk_token + t.image_token if chat else t.image_token

    def image_ids(self, last_was_image: bool, chat: bool, image: object = None) -> list[int]:
        """The token ids of :meth:`image_text` (without the space xGen-MM's chat spelling puts after it)."""
        if self.is_llava:
            return [self.image_token_id] * self.image_token_count(image)
        image = self.image_token_id
        if self.is_idefics:
            fake = self.fake_image_token_id
            return [image, fake] if last_was_image else [fake, image, fake]
        return [self.end_of_chunk_token_id, image] if chat else [image]

    def training_starts_with_bos(self) -> bool:
        """Whether a training row starts with BOS: when the tokenizer adds one, and always for IDEFICS.

        (The processor's ``add_bos=True`` writes the tokenizer's BOS token whenever it has one.)
        """
        return uses_bos(self.tokenizer) or (self.is_idefics and self.tokenizer.bos_token_id is not None)

    def render(self, segments: Sequence[str | object], chat: bool, add_bos: bool, add_eos: bool, add_eou: bool) -> str:
        """One prompt row as text: ``segments`` are text (``str``) and images (anything else).

        Chat rows are the chat template's text with the images in place; plain IDEFICS rows have
        their texts stripped of spaces, ``<end_of_utterance>`` between consecutive texts with
        ``add_eou``. Under xGen-MM's tiling ``add_bos`` holds only when the tokenizer itself puts a
        BOS first (the released tokenizer does not).
        """
        plain_idefics = self.is_idefics and not chat
        out: list[str] = []
        last_was_image = False
        for i, seg in enumerate(segments):
            last_was_text = i > 0 and not last_was_image
            if not isinstance(seg, str):
                out.append(self.image_text(last_was_image, chat, seg))
                last_was_image = True
                continue
            text = seg
            if plain_idefics:
                text = text.strip(" ")
                if add_eou and last_was_text:  # between consecutive texts, as IDEFICS does
                    out.append(self.tokens.end_of_utterance_token)
            out.append(text)
            last_was_image = False
        body = "".join(out)
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        if self.xgenmm_images and not uses_bos(self.tokenizer):
            add_bos = False  # xGen-MM's prompts have no BOS: its tokenizer adds none (add_bos_token false)
        if add_bos and bos and not body.startswith(bos):
            body = bos + body
        if add_eos and eos:
            body += eos
        return body

    # -- spans and truncation --
    def image_spans(self, ids: Sequence[int], chat: bool, counts: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """``[start, end)`` of each image's tokens (see the module docstring: IDEFICS spans of
        consecutive images share their fake token). ``counts``: each image's token count in order,
        needed (and only used) when the count depends on the image (:attr:`sized_images`)."""
        if self.is_llava:
            return self._sized_spans(ids, counts) if self.sized_images else self._run_spans(ids)
        image, fake = self.image_token_id, self.fake_image_token_id
        before = fake if self.is_idefics else (self.end_of_chunk_token_id if chat else None)
        spans = []
        for p, tok in enumerate(ids):
            if tok != image:
                continue
            start = p - 1 if before is not None and p > 0 and ids[p - 1] == before else p
            end = p + 2 if fake is not None and p + 1 < len(ids) and ids[p + 1] == fake else p + 1
            spans.append((start, end))
        return spans

    def _run_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """LLaVA: each run of ``<image>`` tokens, cut into images of :meth:`image_token_count` tokens."""
        image, n = self.image_token_id, self.image_token_count()
        spans, run_start = [], None
        for p, tok in enumerate([*ids, None]):
            if tok == image:
                if run_start is None:
                    run_start = p
                if (p - run_start) % n == n - 1:
                    spans.append((p - n + 1, p + 1))
            else:
                run_start = None
        return spans

    def _sized_spans(self, ids: Sequence[int], counts: Sequence[int] | None) -> list[tuple[int, int]]:
        """Images of different token counts: each run of ``<image>`` tokens is cut by ``counts`` in order.

        A run that the next counts do not fill exactly (a row cut through an image) gives no span
        for its remainder."""
        if counts is None:
            raise InputError("under LLaVA-NeXT tiling the images' token counts are needed to find them in a row; "
                             "pass counts (each image's image_token_count, in order)")
        image, queue = self.image_token_id, list(counts)
        spans, p = [], 0
        while p < len(ids):
            if ids[p] != image:
                p += 1
                continue
            end = p
            while end < len(ids) and ids[end] == image:
                end += 1
            while queue and p + queue[0] <= end:
                spans.append((p, p + queue[0]))
                p += queue.pop(0)
            p = end
        return spans

    def count_images(self, ids: Sequence[int], chat: bool, counts: Sequence[int] | None = None) -> int:
        """The number of images a row's tokens hold (one per span)."""
        return len(self.image_spans(ids, chat, counts))

    def image_starts(self, ids: Sequence[int], counts: Sequence[int] | None = None) -> list[int]:
        """The position of each image's first image token (where a token starts seeing that image)."""
        if self.is_llava:
            return [s for s, _ in self.image_spans(ids, False, counts)]
        return [p for p, tok in enumerate(ids) if tok == self.image_token_id]

    def cut_right(
        self, ids: Sequence[int], budget: int, chat: bool, counts: Sequence[int] | None = None
    ) -> tuple[int, int]:
        """Keep ``ids[:cut]`` with ``cut <= budget``, never through an image -> (cut, images kept)."""
        spans = self.image_spans(ids, chat, counts)
        ends = {e for _, e in spans}
        cut = min(budget, len(ids))
        while cut > 0 and cut not in ends and any(s < cut < e for s, e in spans):
            cut -= 1
        return cut, sum(1 for _, e in spans if e <= cut)

    def cut_left(
        self, ids: Sequence[int], budget: int, chat: bool, counts: Sequence[int] | None = None
    ) -> tuple[int, int]:
        """Keep ``ids[cut:]`` with ``len(ids) - cut <= budget``, never through an image ->
        (cut, images dropped)."""
        spans = self.image_spans(ids, chat, counts)
        starts = {s for s, _ in spans}
        cut = max(0, len(ids) - budget)
        while cut < len(ids) and cut not in starts and any(s < cut < e for s, e in spans):
            cut += 1
        return cut, sum(1 for s, _ in spans if s < cut)

    def __repr__(self) -> str:
        return f"PromptFormat({self.tokens.prompt_format!r})"


__all__ = ["IGNORE_INDEX", "PromptFormat", "uses_bos"]
