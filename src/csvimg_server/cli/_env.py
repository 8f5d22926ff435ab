"""Options that fall back to ``CSVIMG_*`` environment variables.

One rule for every command: an option given on the command line wins
over the variable, which wins over the default; a variable that is
unset, empty or only blanks counts as unset, and surrounding blanks are
ignored. A value that does not parse is a `UsageError` naming the
variable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from csvimg_server.cli._errors import UsageError

__all__ = ["choice_option", "env_value", "int_option", "option_or_env", "seconds_option"]


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """Return the variable *name* without surrounding blanks; None when unset or blank."""
    raw = env.get(name, "").strip()
    return raw or None


def option_or_env(value: Any, env: Mapping[str, str], name: str) -> Any:
    """Return the option if given, else the environment variable (None if unset)."""
    if value is not None:
        return value
    return env_value(env, name)


def int_option(value: Any, env: Mapping[str, str], name: str, default: int, low: int) -> int:
    """Return a whole number >= *low* from the option, else *name*, else *default*."""
    raw = option_or_env(value, env, name)
    if raw is None:
        return default
    try:
        number = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw!r}") from None
    if number < low:
        raise UsageError(f"{name} must be at least {low}, not {number}")
    return number


def seconds_option(value: Any, env: Mapping[str, str], name: str, default: float, *,
                   option: str) -> float:
    """Return a finite number of seconds >= 0 from the option, else *name*, else *default*.

    *option* is the command-line spelling, named in the error with *name*.
    """
    raw = option_or_env(value, env, name)
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UsageError(f"{option} / {name} must be a number of seconds >= 0, not {raw!r}")
    return seconds


def choice_option(value: str | None, env: Mapping[str, str], name: str, default: str,
                  allowed: Sequence[str]) -> str:
    """Return one of *allowed* (lower case) from the option, else *name*, else *default*."""
    chosen = str(option_or_env(value, env, name) or default).lower()
    if chosen not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}, not {chosen!r}")
    return chosen
