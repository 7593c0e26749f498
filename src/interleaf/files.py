"""One reader per file kind: YAML, JSON and JSON lines.

Each reader takes the path and ``what`` the file is for (``"mixture"``, ``"task file"``), and
every failure (a missing file, a file that is not UTF-8, broken syntax) is an interleaf error that
names the file, the line where the parser knows it, and what to fix. YAML files are config, so
their errors are :class:`~interleaf.errors.ConfigError` naming ``what`` as the field; JSON and
JSON-lines files are data, so theirs are :class:`~interleaf.errors.InputError` unless the caller
passes a config ``field``, or another interleaf ``error`` class for files that are not user data
(a checkpoint's own files raise :class:`~interleaf.errors.CheckpointError`).

A JSON-lines reader that must not stop at a bad line (a stream that counts bad samples, a log
whose last line an interrupted write tore) passes ``on_bad_line``: each line that does not parse
is handed to it and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CheckpointError, ConfigError, InputError


def user_path(path: str | Path, field: str) -> Path:
    """``path`` with ``~`` expanded; a NUL byte or an unknown ``~user`` is a :class:`ConfigError` naming ``field``."""
    text = str(path)
    if "\x00" in text:
        raise ConfigError(field, f"{text!r} holds a NUL character, which no path may hold; check the path")
    try:
        return Path(text).expanduser()
    except RuntimeError as e:  # "~someone" for an unknown user, or no home directory
        raise ConfigError(field, f"cannot expand '~' in {text!r} ({e})", "write the full path") from e


def names_a_directory(text: str | Path, field: str = "model") -> bool:
    """Whether ``text`` (a ``--model`` value, a stage's ``model:``) means a local directory rather than a
    preset name: an existing directory, or any path with a ``/`` (a run may write it later). Preset
    names hold no ``/``."""
    return "/" in str(text) or user_path(text, field).is_dir()


def local_dir(path: str | Path, what: str, needs: tuple[str, ...] = (), *,
              save_with: str = "save it with save_pretrained") -> Path:
    """``path`` as an existing local directory holding each file in ``needs``, else a
    :class:`~interleaf.errors.CheckpointError` naming ``what`` (interleaf never downloads)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(
            f"{what} {str(path)!r} is not a local directory. interleaf loads {what}s only from local paths "
            f"(it never downloads): {save_with}, or download it yourself, then pass the directory"
        )
    missing = [n for n in needs if not (p / n).exists()]
    if missing:
        raise CheckpointError(f"{what} {str(p)!r} lacks {', '.join(missing)}; it does not look like a "
                              "save_pretrained directory")
    return p


def _text(p: Path, error, kind: str) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{str(p)!r} is not UTF-8 text ({e})", f"save the {kind} file as UTF-8") from e
    except OSError as e:
        raise error(f"cannot read {str(p)!r} ({e.strerror or e})", "check the file's permissions") from e


def read_yaml(path: str | Path, what: str = "config", fix: str | None = None) -> Any:
    """The parsed YAML file at ``path``; every failure is a :class:`ConfigError` naming ``what``.

    ``fix`` is the advice for a missing file (e.g. "pass the path of a mixture YAML").
    """
    import yaml

    def error(problem: str, advice: str | None = None) -> ConfigError:
        return ConfigError(what, problem, advice)

    p = user_path(path, what)
    if not p.is_file():
        raise error(f"file {str(p)!r} does not exist", fix)
    text = _text(p, error, "YAML")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{str(p)!r} is not valid YAML{where}: {problem}", "fix the YAML syntax there") from e
    except RecursionError as e:
        raise error(f"{str(p)!r} nests too deeply to read", "write a flatter YAML file") from e


def _json_error(what: str, field: str | None, error: Callable[[str], Exception]):
    def make(problem: str, advice: str | None = None) -> Exception:
        if field is not None:
            return ConfigError(field, problem, advice)
        return error(f"{what}: {problem}" + (f" ({advice})" if advice else ""))

    return make


def read_json(path: str | Path, what: str = "JSON file", *, field: str | None = None,
              error: Callable[[str], Exception] = InputError) -> Any:
    """The parsed JSON file at ``path``; failures name the file, the line and column, and the fix.

    A failure is ``error(message)`` (an :class:`InputError` unless told), or a :class:`ConfigError`
    naming ``field`` when one is given; the message starts with ``what``.
    """
    make = _json_error(what, field, error)
    p = Path(path).expanduser()
    if not p.is_file():
        raise make(f"file {str(p)!r} does not exist", "check the path")
    text = _text(p, make, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise make(f"{str(p)!r} is not valid JSON, line {e.lineno}, column {e.colno}: {e.msg}",
                   "fix the JSON syntax there") from e
    except RecursionError as e:
        raise make(f"{str(p)!r} nests too deeply to read", "write flatter JSON") from e


BadLine = Callable[[int, Exception], None]


def iter_jsonl(path: str | Path, what: str = "JSON-lines file", *, field: str | None = None,
               error: Callable[[str], Exception] = InputError,
               on_bad_line: BadLine | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file.

    A line that does not parse is an error naming the file and the line (raised as
    :func:`read_json` raises), unless ``on_bad_line`` is given: then it is called with the line
    number and the parser's exception (a ``json.JSONDecodeError``, or a ``RecursionError`` for a
    line nested too deeply) and the line is skipped. A missing or unreadable file is an error
    either way.
    """
    make = _json_error(what, field, error)
    p = Path(path).expanduser()
    if not p.is_file():
        raise make(f"file {str(p)!r} does not exist", "check the path")
    for n, line in enumerate(_text(p, make, "JSON-lines").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if on_bad_line is not None:
                on_bad_line(n, e)
                continue
            if isinstance(e, RecursionError):
                raise make(f"{str(p)!r} line {n} nests too deeply to read", "write flatter JSON") from e
            raise make(f"{str(p)!r} line {n} is not valid JSON (column {e.colno}: {e.msg})",
                       "write one JSON value per line") from e
        yield n, value


def read_jsonl(path: str | Path, what: str = "JSON-lines file", *, field: str | None = None,
               error: Callable[[str], Exception] = InputError, on_bad_line: BadLine | None = None) -> list[Any]:
    """Every value of a JSON-lines file (blank lines skipped); errors name the file and the line.

    ``error`` and ``on_bad_line`` are :func:`iter_jsonl`'s.
    """
    return [value for _, value in iter_jsonl(path, what, field=field, error=error, on_bad_line=on_bad_line)]


def skip_bad_line(n: int, e: Exception) -> None:
    """An ``on_bad_line`` that skips the line and says nothing (for a log an interrupted write may have torn)."""


__all__ = [
    "BadLine", "iter_jsonl", "local_dir", "names_a_directory", "read_json", "read_jsonl", "read_yaml", "skip_bad_line",
    "user_path",
]
