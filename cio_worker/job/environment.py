"""Job environment entries and how they merge onto the node's environment (contract.md 7).

Entries are applied in order on top of the node's base environment: ``exclusive`` sets (replaces),
``append`` adds after the value so far, ``prepend`` before it, joined with ``:`` on Linux
(``;`` on Windows); an empty value so far counts as unset. Values may reference variables
(``$PYTHONPATH``, ``${HOME}``), expanded on the node against the environment built so far;
``$$`` is a literal ``$``; an unset variable expands to nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from cio_worker.errors import EnvironmentSpecError

MERGE_POLICIES = ("exclusive", "append", "prepend")
_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)|(\{[^}]*\}?))")
# Names whose values are masked in logs (matched anywhere in the variable name, any case).
SECRET_MARKERS = ("SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "PRIVATE", "API_KEY", "ACCESS_KEY", "AUTH")


@dataclass(frozen=True)
class EnvEntry:
    name: str
    value: str
    merge_policy: str = "exclusive"

    def __post_init__(self) -> None:
        if self.merge_policy not in MERGE_POLICIES:
            raise EnvironmentSpecError(
                f"environment entry {self.name}: merge policy {self.merge_policy!r} is not one of "
                + ", ".join(MERGE_POLICIES)
            )

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "value": self.value, "merge_policy": self.merge_policy}


def separator_for(platform: str) -> str:
    return ";" if platform.lower().startswith("win") else ":"


def expand_references(value: str, env: Mapping[str, str]) -> str:
    """Expand ``$NAME`` and ``${NAME}`` from ``env``; ``$$`` is ``$``; unset is empty."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(3) is not None:
            # Never quote the value: it may be a secret that would reach logs and the queue.
            raise EnvironmentSpecError(
                f"a variable reference at character {match.start() + 1} is malformed: write ${{NAME}} with a "
                "closing brace and a name of letters, digits and underscores, or $$ for a literal $"
            )
        return env.get(match.group(1) or match.group(2), "")

    return _REFERENCE.sub(substitute, value)


def merge_environment(
    base: Mapping[str, str],
    entries: Iterable[EnvEntry],
    *,
    platform: str = "linux",
    expand: bool = True,
) -> dict[str, str]:
    """Apply ``entries`` in order on top of a copy of ``base``; return the new environment."""
    env = dict(base)
    sep = separator_for(platform)
    for entry in entries:
        try:
            value = expand_references(entry.value, env) if expand else entry.value
        except EnvironmentSpecError as exc:
            raise EnvironmentSpecError(f"environment entry {entry.name}: {exc}") from None
        so_far = env.get(entry.name, "")
        if entry.merge_policy == "exclusive" or so_far == "":
            merged = value
        elif value == "":
            merged = so_far
        elif entry.merge_policy == "append":
            merged = so_far + sep + value
        else:
            merged = value + sep + so_far
        env[entry.name] = merged
    return env


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def masked(env: Mapping[str, str], extra_secret_names: Iterable[str] = ()) -> dict[str, str]:
    """A copy of ``env`` with secret-looking values replaced by ``****``."""
    extra = {n.upper() for n in extra_secret_names}
    return {k: ("****" if (is_secret_name(k) or k.upper() in extra) and v else v) for k, v in env.items()}
