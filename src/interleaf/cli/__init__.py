"""``interleaf <verb>``: a thin map from verbs to typed functions (Typer).

Each module in this package defines ``register(app)`` adding its verbs; they are discovered here,
so a new verb is a new module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

app = typer.Typer(
    name="interleaf",
    help="Build, train, evaluate and serve Flamingo-lineage vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_verbs() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_verbs()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``interleaf`` command; user errors print one clear line, not a traceback."""
    from ..errors import InterleafError

    try:
        app(args=argv, standalone_mode=True)
    except InterleafError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
