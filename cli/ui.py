"""What every command prints through: two consoles, one-line errors and warnings, JSON.

Text that comes from users (messages that quote config keys like ``[judge]``, rids, paths) is
escaped before rich renders it, so nothing in it is read as markup.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

__all__ = ["cell", "console", "err", "escape", "fail", "print_json", "warn"]


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, ``error: MESSAGE`` (verbatim), then exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One line on stderr, ``warning: MESSAGE`` (verbatim)."""
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def cell(value: Any) -> Text:
    """A table cell shown as written (never parsed as markup)."""
    return value if isinstance(value, Text) else Text(str(value))


def print_json(value: Any) -> None:
    """Pretty JSON on stdout, for scripts (`--json`)."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()
