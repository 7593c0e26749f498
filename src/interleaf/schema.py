"""One reader for every config: typed dataclasses checked against their own type hints.

A config section is a dataclass. Its type hints say what each field takes, :func:`setting`
declares ranges (``ge``, ``gt``, ``le``) and non-empty values in the field's metadata, and an
optional ``_check(self, path)`` method holds the rules that relate several fields. :func:`read`
turns a mapping (from YAML, JSON or Python) into the dataclass; :func:`validate` checks an
instance built directly. Every error is a :class:`~interleaf.errors.ConfigError` naming the dotted
path of the value, e.g. ``config field 'optim.lr': expected a number, got 'fast'``.

What each type hint accepts
---------------------------

- ``bool``: ``true`` / ``false`` only (not 0, 1 or ``"yes"``).
- ``int``: an integer only (not ``true``, not ``2.0``, not ``"8"``).
- ``float``: an integer, a float, or a string that spells a decimal number (``"1e-4"``,
  ``"3.0E-5"``, ``"-2"``). YAML 1.1 reads ``1e-4`` (no dot) as a string although users mean a
  number, so every float field of every config takes it. The number must be finite.
- ``str``: a string. ``Literal["a", "b"]``: one of the listed values.
- ``list[X]``: a list (or tuple) whose items each read as ``X``; ``tuple[X, Y]``: exactly that
  many items; ``tuple[X, ...]``: any number. ``dict[K, V]``: a mapping, each value read as ``V``.
- ``X | None``: ``null`` or an ``X``; ``X | Y``: the first member that reads the value.
- A nested dataclass: a mapping read by the same rules (``null`` reads as all defaults).
- ``Any``: anything.

Unknown keys are errors that suggest the closest known name. Ranges apply to a number, or to each
number of a list or tuple.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError

NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_NONE = type(None)


def setting(
    default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
    gt: float | None = None, le: float | None = None, nonempty: bool = False, internal: bool = False,
) -> Any:
    """A dataclass field with a declared range or non-emptiness.

    ``internal`` marks a field set by the program (e.g. the folder a file came from), never read
    from a config: it is not a known key and is not checked.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "nonempty": nonempty, "internal": internal}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def join(path: str, name: str | int) -> str:
    """``join("optim", "lr") == "optim.lr"``, ``join("sources", 1) == "sources[1]"``."""
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else str(name)


def show(value: Any, limit: int = 60) -> str:
    """A short ``repr`` of ``value`` for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def with_context(error: ConfigError, prefix: str = "", suffix: str = "") -> ConfigError:
    """The same error with ``prefix`` before its field and ``suffix`` after its message."""
    head = f"config field '{error.field}': "
    text = str(error)
    body = text[len(head):] if text.startswith(head) else text
    new = ConfigError(f"{prefix}{error.field}", body + suffix)
    new.__cause__ = error.__cause__
    return new


def suggest(name: Any, known: typing.Iterable[str]) -> str:
    """``"did you mean 'lr'? "`` when ``name`` is close to a known name, else ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a config file may set (internal ones left out)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def reject_unknown(data: Mapping, known: typing.Iterable[str], path: str) -> None:
    """An unknown key of ``data`` is an error naming it, the closest known name, and all of them."""
    known = list(known)
    unknown = [k for k in data if k not in known]
    if unknown:
        key = sorted(unknown, key=str)[0]
        raise ConfigError(join(path, str(key)), "unknown field",
                          f"{suggest(key, known)}known fields: {', '.join(sorted(known))}")


def describe(hint: Any) -> str:
    """``float | None`` -> ``"a number or null"``: what a hint accepts, in words."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(hint))
    if origin is Literal:
        return f"one of {list(get_args(hint))}"
    if dataclasses.is_dataclass(hint) or origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", _NONE: "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` read as ``hint`` (see the module docstring), or a :class:`ConfigError` at ``path``."""
    if hint is Any:
        return value
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return _union(value, hint, path)
    if origin is Literal:
        choices = get_args(hint)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        close = suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(path, f"expected one of {list(choices)}, got {show(value)}", close.strip() or None)
    if dataclasses.is_dataclass(hint):
        return read(hint, value, path)
    if origin in (list, tuple) or hint in (list, tuple):
        return _sequence(value, hint, path)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {show(value)}")
        args = get_args(hint) or (Any, Any)
        return {coerce(k, args[0], path): coerce(v, args[1], join(path, str(k))) for k, v in value.items()}
    return _scalar(value, hint, path)


def _scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is _NONE:
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, str) and NUMBER.match(value):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(path, f"expected a finite number, got {show(value)}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"interleaf.schema cannot read the type hint {hint!r} (at {path})")
    raise ConfigError(path, f"expected {describe(hint)}, got {show(value)}")


def _union(value: Any, hint: Any, path: str) -> Any:
    members = get_args(hint)
    if value is None and _NONE in members:
        return None
    options = [m for m in members if m is not _NONE]
    errors = []
    for member in options:
        try:
            return coerce(value, member, path)
        except ConfigError as e:
            errors.append(e)
    deeper = [e for e in errors if e.field != path]
    if len(options) == 1 or len(deeper) == 1:
        raise (deeper or errors)[0]
    raise ConfigError(path, f"expected {describe(hint)}, got {show(value)}")


def _sequence(value: Any, hint: Any, path: str) -> Any:
    origin = get_origin(hint) or hint
    args = get_args(hint)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list, got {show(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} items, got {len(value)}: {show(value)}")
        return tuple(coerce(v, a, join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [coerce(v, item, join(path, i)) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _bounds(value: Any, meta: Mapping, path: str) -> None:
    if value is None:
        return
    if meta.get("nonempty") and isinstance(value, (str, list, tuple, dict)) and not value:
        raise ConfigError(path, "must not be empty")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _bounds(v, {**meta, "nonempty": False}, join(path, i))
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        parts = [f">= {ge:g}" if ge is not None else None, f"> {gt:g}" if gt is not None else None,
                 f"<= {le:g}" if le is not None else None]
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ConfigError(path, f"must be {kind} {' and '.join(p for p in parts if p)}, got {show(value)}")


def validate(obj: Any, path: str = "") -> Any:
    """Check (and normalise: ``"1e-4"`` -> ``0.0001``, lists -> tuples) every field of a config dataclass."""
    types_ = hints(type(obj))
    for name, f in fields_of(type(obj)).items():
        value = coerce(getattr(obj, name), types_[name], join(path, name))
        _bounds(value, f.metadata, join(path, name))
        object.__setattr__(obj, name, value)
    check = getattr(obj, "_check", None)
    if check is not None:
        check(path)
    return obj


def read(cls: type, data: Any, path: str = "", *, name: str | None = None) -> Any:
    """An instance of the config dataclass ``cls`` read from the mapping ``data``.

    ``path`` is where ``data`` sits (``"optim"``, ``"sources[1]"``); ``name`` names a top-level
    value in its own errors (``"mixture"``). A class with a ``from_config(data, path)`` classmethod
    reads its own shorthand forms.
    """
    if isinstance(data, cls):
        return validate(data, path)
    own = getattr(cls, "from_config", None)
    if own is not None:
        return own(data, path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path or name or cls.__name__, f"expected a mapping, got {show(data)}")
    known = fields_of(cls)
    reject_unknown(data, known, path)
    for key, f in known.items():
        if key not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(join(path, key), "is required")
    types_ = hints(cls)
    values = {k: coerce(v, types_[k], join(path, k)) for k, v in data.items()}
    for key, value in values.items():
        _bounds(value, known[key].metadata, join(path, key))
    return validate(cls(**values), path)


__all__ = [
    "NUMBER", "coerce", "describe", "fields_of", "join", "read", "reject_unknown", "setting", "show", "suggest",
    "validate", "with_context",
]
