"""Choice fields: each is an `enum.StrEnum` defined once, in the module that owns the concept (latent.py's
patch orders, run_options.py's remat policies, config.py's schedules...). A member compares and hashes equal
to its string and `json` writes it as that string, so files written by older code read as they did."""

from __future__ import annotations

import enum
from typing import TypeVar

Choice = TypeVar("Choice", bound=enum.StrEnum)


def names(choices: type[enum.StrEnum]) -> list[str]:
    """The choices' strings, sorted (what an error lists)."""
    return sorted(member.value for member in choices)


def parse(choices: type[Choice], value, key: str) -> Choice:
    """`value` (a string or a member) as a member of `choices`; else ValueError "key: 'x' is not allowed;
    choose one of [...]"."""
    try:
        return choices(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not allowed; choose one of {names(choices)}") from None


def plain(value):
    """`value` with a choice member turned into its plain string (for writers that refuse str subclasses:
    yaml.safe_dump)."""
    return value.value if isinstance(value, enum.StrEnum) else value
