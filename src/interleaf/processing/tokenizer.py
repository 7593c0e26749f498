"""A tiny byte-level BPE tokenizer, trained offline in milliseconds.

:func:`load_tokenizer` loads a saved tokenizer from a local directory, offline.

Tiny random models (tests, the demo) need a real tokenizer without downloading one.
:func:`build_tiny_tokenizer` trains a byte-level BPE with the ``tokenizers`` library on a small
built-in English text (or the text given), so every string round-trips, and wraps it as a
``transformers`` fast tokenizer with ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` and the ChatML-like
chat template in ``chat_templates/chatml.jinja``. The same inputs always give the same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import CheckpointError
from ..files import local_dir

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"

DEFAULT_TEXT = """\
A picture shows a small red cat sitting on a wooden table next to a blue cup.
The dog runs across the green field and jumps over a fallen tree near the river.
Question: What colour is the car? Short answer: The car is yellow.
Output: Two people are riding bicycles along a quiet street at sunset.
There is a large square, a small circle and a triangle in the image.
The circle is green, the square is red and the triangle is blue.
User: Describe this image in one sentence.
Assistant: A child is flying a kite on a windy beach under a cloudy sky.
How many birds are on the wire? There are three birds on the wire.
Where is the boy standing? He is standing in front of the old stone house.
A bowl of fruit with apples, bananas and oranges sits by the window.
The train leaves the station in the morning and arrives in the city at noon.
She reads a book about the history of the mountains and the people who live there.
Is the light on or off? The light is on. Is the door open? No, it is closed.
The weather today is warm and sunny, with a light wind from the west.
A man in a black coat waits for the bus while it starts to rain.
Colours: red, green, blue, yellow, orange, purple, black, white, grey, brown, pink.
Shapes: square, circle, triangle, star, heart, line, dot, rectangle, cross.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9.
Where: left, right, top, bottom, middle, above, below, behind, inside, outside.
The model looks at each image and writes what it sees, then answers the question.
Training starts with frozen language and vision models; only the new layers learn.
Good captions are short and say what matters: who is there, what they do, and where.
"""


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the local directory ``path`` (never downloads).

    Raises :class:`~interleaf.errors.CheckpointError` naming the directory when it is missing or
    holds no loadable tokenizer.
    """
    p = local_dir(path, "tokenizer", save_with="save one with tokenizer.save_pretrained(dir)")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot load a tokenizer from {str(p)!r}: {e}; pass a directory written by "
            "tokenizer.save_pretrained (tokenizer.json or tokenizer_config.json)"
        ) from e


def _default_chat_template() -> str:
    return (CHAT_TEMPLATES_DIR / "chatml.jinja").read_text(encoding="utf-8")


def build_tiny_tokenizer(text: str | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``text`` (default: a built-in one).

    Special tokens: ``<s>`` (bos, id 0), ``</s>`` (eos, 1), ``<pad>`` (2), ``<unk>`` (3). With
    ``add_special_tokens=True`` the bos token is put first. Deterministic and offline.
    """
    specials = [BOS, EOS, PAD, UNK]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
            f"{len(specials) + len(alphabet)} tokens (4 special + 256 bytes)"
        )
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = text if text is not None else DEFAULT_TEXT
    tok.train_from_iterator(corpus.splitlines(keepends=True) or [corpus], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=2048,
    )
    tokenizer.chat_template = _default_chat_template()
    return tokenizer
