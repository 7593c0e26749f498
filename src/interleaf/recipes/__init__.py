"""The training recipes shipped with interleaf, addressable by name.

The YAML files in this folder are package data: they are installed with the package, so
``interleaf train sft_llava`` works after ``pip install interleaf`` without the source tree.
A recipe's data mixtures sit in a ``data/`` folder next to it and are named by paths relative to
the recipe's folder, so the layout here is the layout the recipes rely on.

Names are paths relative to this folder without ``.yaml``; a folder's ``recipe.yaml`` is named by
the folder: ``pretrain``, ``sft_llava``, ``demo``, ``seeds/idefics``, ``seeds/idefics/instruct``.
Files under a ``data/`` folder are data mixtures, not recipes.

    from interleaf.recipes import resolve, available
    resolve("seeds/idefics")   # .../interleaf/recipes/seeds/idefics/recipe.yaml
    resolve("my_run.yaml")     # an existing file wins over a packaged name
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..files import read_yaml, user_path
from ..errors import ConfigError

ROOT = Path(__file__).resolve().parent


def _name_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").as_posix()
    return rel.removesuffix("/recipe") if rel.endswith("/recipe") else rel


def _recipe_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.yaml") if "data" not in p.relative_to(ROOT).parts[:-1])


def available() -> dict[str, Path]:
    """Every packaged recipe: its name -> its file, sorted by name."""
    return dict(sorted((_name_of(p), p) for p in _recipe_files()))


def resolve(name_or_path: str | Path, field: str = "config") -> Path:
    """The YAML file ``name_or_path`` means: an existing file, else the packaged recipe of that name.

    A name may end in ``.yaml``; ``seeds/idefics`` means ``seeds/idefics/recipe.yaml``. Anything
    else is a :class:`ConfigError` naming ``field``, listing the packaged names.
    """
    path = user_path(name_or_path, field)
    if path.is_file():
        return path
    recipes = available()
    key = str(name_or_path).replace("\\", "/").strip("/")
    key = key.removesuffix(".yaml").removesuffix(".yml")
    if key in recipes:
        return recipes[key]
    if key.endswith("/recipe") and key.removesuffix("/recipe") in recipes:
        return recipes[key.removesuffix("/recipe")]
    what = "a folder, not a YAML file" if path.is_dir() else "not an existing file"
    raise ConfigError(
        field,
        f"{str(name_or_path)!r} is {what} and not the name of a packaged recipe; "
        f"packaged recipes: {', '.join(recipes)}",
        "pass one of these names (`interleaf recipes` lists them with their paths), "
        "or the path of your own recipe YAML",
    )


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: Path
    description: str
    stages: tuple[str, ...]


def _outside_brackets(text: str, i: int) -> bool:
    head = text[:i]
    return sum(head.count(c) for c in "([{") == sum(head.count(c) for c in ")]}")


def _description(text: str, limit: int = 100) -> str:
    """The first sentence of the file's leading comment, shortened to ``limit`` characters."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not body:
            break
        lines.append(body)
    words = " ".join(lines)
    sentence = re.split(r"(?<=[.;])\s", words, maxsplit=1)[0].rstrip(".;")
    if len(sentence) > limit:  # at the last clause boundary that fits, else at a word
        cuts = [m.start() for m in re.finditer(r"[,:;](?= )| [({]", sentence[: limit + 1])
                if m.start() >= 30 and _outside_brackets(sentence, m.start())]
        sentence = sentence[: cuts[-1]] if cuts else sentence[: limit - 3].rsplit(" ", 1)[0] + "..."
    return sentence


def describe() -> list[RecipeInfo]:
    """Every packaged recipe with its one-line description and its stages' names."""
    infos = []
    for name, path in available().items():
        text = path.read_text(encoding="utf-8")
        data = read_yaml(path, f"recipe {name}") or {}
        stages = data.get("stages") if isinstance(data, dict) else None
        if isinstance(stages, list):
            names = tuple(str(s.get("name", i)) if isinstance(s, dict) else str(i) for i, s in enumerate(stages))
        else:
            names = (str(data.get("name", "stage")),) if isinstance(data, dict) else ()
        infos.append(RecipeInfo(name, path, _description(text), names))
    return infos


__all__ = ["ROOT", "RecipeInfo", "available", "describe", "resolve"]
