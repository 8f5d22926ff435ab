"""Exit codes of the ``csvimg`` command and the error that means "usage"."""

from __future__ import annotations

from typing import Final, TextIO

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "print_error"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class UsageError(Exception):
    """A bad option or environment variable: print it and exit 2."""


def print_error(prog: str, command: str, message: str, stream: TextIO) -> None:
    """Print a usage error the way argparse prints its own: ``csvimg serve: error: ...``."""
    print(f"{prog} {command}: error: {message}", file=stream)
