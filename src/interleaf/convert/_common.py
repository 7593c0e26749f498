"""Shared pieces of the checkpoint converters: reading foreign weights safely, strict key checks,
and filling a model built on the meta device from a mapped state dict.

Foreign weights are read from safetensors (single file or sharded with an index), or from
``.bin`` / ``.pt`` pickles with ``torch.load(weights_only=True)`` only, so a checkpoint can never
run code. Every converter maps keys with an explicit table; :func:`check_keys` turns any key
that is missing, unexpected or of the wrong shape into one :class:`CheckpointError` listing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from ..files import read_json

_LISTED = 12  # keys named in one error message, per category


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` / ``.pt`` state dict, loaded without running code (``weights_only=True``)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpicklable object, a truncated file, ...
        raise CheckpointError(
            f"cannot load {str(path)!r} safely with torch.load(weights_only=True): {e}. Only plain "
            "tensor state dicts are accepted; convert the file to safetensors if it holds other objects"
        ) from e
    if isinstance(data, dict) and "model_state_dict" in data and isinstance(data["model_state_dict"], dict):
        data = data["model_state_dict"]  # a training checkpoint that also holds optimiser state
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return dict(data)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` directory (safetensors preferred, pickles safely)."""
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    for index_name, loader in (
        ("model.safetensors.index.json", lambda p: load_file(str(p))),
        ("pytorch_model.bin.index.json", load_pickle),
    ):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index", error=CheckpointError).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            if not files:
                raise CheckpointError(f"{str(index)!r} lists no weight files")
            state: dict[str, torch.Tensor] = {}
            for name in files:
                if not (directory / name).is_file():
                    raise CheckpointError(f"{str(index)!r} names {name!r}, which is not in {str(directory)!r}")
                state.update(loader(directory / name))
            return state
    pickle = directory / "pytorch_model.bin"
    if pickle.is_file():
        return load_pickle(pickle)
    raise CheckpointError(
        f"{str(directory)!r} holds no weights: expected model.safetensors, a sharded "
        "model.safetensors.index.json, or pytorch_model.bin (as save_pretrained writes them)"
    )


def _listing(title: str, keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED]) + (f" ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else "")
    return f"{title} ({len(keys)}): {shown}"


def check_keys(
    mapped: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    *,
    what: str,
    unmapped: Iterable[str] = (),
) -> None:
    """Raise one error naming every missing, unexpected, unmapped or mis-shaped key."""
    problems = []
    unmapped = list(unmapped)
    if unmapped:
        problems.append(_listing("source keys the converter does not know", unmapped))
    missing = set(expected) - set(mapped)
    if missing:
        problems.append(_listing("missing keys", missing))
    unexpected = set(mapped) - set(expected)
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    shapes = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(set(mapped) & set(expected))
        if tuple(mapped[k].shape) != tuple(expected[k])
    ]
    if shapes:
        problems.append(_listing("shape mismatches (checkpoint vs model)", shapes))
    if problems:
        raise CheckpointError(
            f"{what}: the weights do not match the architecture read from its config. "
            + "; ".join(problems)
            + ". Is the config.json the one these weights were saved with?"
        )


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def fill_meta_model(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Give a model built on the meta device the tensors of ``state`` (strictly, no copies)."""
    check_keys(state, expected_shapes(model), what=what)
    result = model.load_state_dict(dict(state), strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - strict=True raises first
        raise CheckpointError(f"{what}: could not load {result}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / n).is_file() for n in TOKENIZER_FILES)


def optional_tokenizer(directory: Path, tokenizer: Any):
    """The tokenizer of a checkpoint whose tokenizer files are optional: ``tokenizer`` itself when it is
    one, else the one saved in ``tokenizer`` (a directory, which must hold one) or in ``directory``;
    None when neither was given and ``directory`` has none."""
    from ..processing.tokenizer import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    source = Path(tokenizer) if tokenizer is not None else directory
    if not has_tokenizer_files(source):
        if tokenizer is not None:
            raise CheckpointError(f"{str(source)!r} has no tokenizer files (tokenizer.json or tokenizer.model)")
        return None
    return load_tokenizer(source)


def checkpoint_tokenizer(directory: Path, tokenizer: Any, family: str):
    """The tokenizer a converter uses: ``tokenizer`` itself when it is one, else the one saved in
    ``tokenizer`` (a directory) or in the checkpoint ``directory``; a missing pad token becomes the
    unknown (or end) token. ``family`` ("IDEFICS", "LLaVA") names the checkpoint in errors."""
    from ..processing.tokenizer import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    source = Path(tokenizer) if tokenizer is not None else directory
    if not has_tokenizer_files(source):
        raise CheckpointError(
            f"{str(source)!r} has no tokenizer files; save the {family} processor (or tokenizer) into the "
            f"checkpoint directory, or pass tokenizer=<directory with the {family} tokenizer>"
        )
    tok = load_tokenizer(source)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = processor_chat_template(source)
    return tok


def processor_chat_template(directory: Path) -> str | None:
    """The chat template a transformers processor saved in ``directory`` (``chat_template.json``, as llava-hf
    checkpoints hold it, or ``chat_template.jinja``), for a tokenizer that has none of its own; else None."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "chat_template.json").is_file():
        data = read_json(directory / "chat_template.json", "chat template", error=CheckpointError)
        template = data.get("chat_template") if isinstance(data, dict) else None
        return template if isinstance(template, str) else None
    return None
