"""The command lines of the repository's scripts (benchmarks, test servers): one typer command each, run
from a ``main(argv)`` that tests can call with a list of arguments.

    app = typer.Typer(add_completion=False)

    @app.command()
    def bench(frames: int = 16) -> dict: ...

    def main(argv: list[str] | None = None) -> dict:
        return commandline.run(app, argv)   # what the command returned

``run`` behaves as argparse did for these scripts: ``--help`` exits 0 and a usage error exits 2 with its
message on stderr (``SystemExit``), while anything else the command raises (KeyboardInterrupt included)
reaches the caller unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from typer import rich_utils


def run(app: typer.Typer, argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` (default: ``sys.argv[1:]``) for the app's one command, run it, return its result."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with command.make_context(Path(sys.argv[0]).name, args) as ctx:
            return command.invoke(ctx)
    except typer.Exit as exc:  # --help, or the command's own typer.Exit(code)
        raise SystemExit(exc.exit_code) from None
    except typer.TyperException as exc:  # a usage error: bad or missing option
        rich_utils.rich_format_error(exc)
        raise SystemExit(exc.exit_code) from None


def bare_option(argv: Sequence[str] | None, option: str, value: str) -> list[str]:
    """argparse's ``nargs="?"`` for typer: ``option`` given without a value (last, or followed by another
    option) means ``option=value``; ``option VALUE`` and ``option=VALUE`` are left as they are."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [
        f"{option}={value}" if arg == option and (i + 1 == len(args) or args[i + 1].startswith("-")) else arg
        for i, arg in enumerate(args)
    ]
