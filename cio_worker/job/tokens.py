"""Template tokens (contract.md 6): ``<name>`` tokens, ``<<`` for a literal ``<``, modifier forms.

A name is letters and underscores, at least two characters. Modifier forms take a token name:
``<pad x N>`` (the integer value zero-padded to N digits, a minus sign kept in front),
``<posix x>``, ``<upper x>``, ``<lower x>``, ``<basename x>``, ``<basename_x x>``. Path modifiers
work inside double quotes, so ``<posix directories>`` on ``"C:\\a" "C:\\b"`` gives ``"/a" "/b"``.

The module only substitutes: values arrive formatted (strings) from the caller, which knows the
job. ``chunk_values`` is the one helper that computes values, those that depend only on frames.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from cio_worker.errors import FrameSpecError, TokenError
from cio_worker.job.frames import FrameSet
from cio_worker.job.paths import posix_path


class Scope(IntEnum):
    """Where a value is the same: wider scopes come first. A template of scope S may use the
    tokens whose scope is S or wider."""

    GLOBAL = 0
    JOB = 1
    TASK = 2
    TILE = 3

    @property
    def label(self) -> str:
        return self.name.capitalize()


# The seed's token table. ``sources`` has a job-wide value and a per-task one: its widest scope.
TOKENS: Mapping[str, Scope] = MappingProxyType(
    {
        "sequence": Scope.JOB,
        "sequencelength": Scope.JOB,
        "sequencemin": Scope.JOB,
        "sequencemax": Scope.JOB,
        "chunksize": Scope.JOB,
        "chunkcount": Scope.JOB,
        "scout": Scope.JOB,
        "scoutcount": Scope.JOB,
        "cores": Scope.JOB,
        "flavor": Scope.JOB,
        "instance": Scope.JOB,
        "preemptible": Scope.JOB,
        "retries": Scope.JOB,
        "job": Scope.JOB,
        "project": Scope.JOB,
        "sources": Scope.JOB,
        "directories": Scope.JOB,
        "tiles": Scope.JOB,
        "render_package": Scope.GLOBAL,
        "pdir": Scope.GLOBAL,
        "temp_dir": Scope.GLOBAL,
        "chunks": Scope.TASK,
        "chunklength": Scope.TASK,
        "chunkstart": Scope.TASK,
        "chunkend": Scope.TASK,
        "tile_number": Scope.TILE,
    }
)

MODIFIERS = ("pad", "posix", "upper", "lower", "basename", "basename_x")
MAX_PAD = 64

_NAME = r"[A-Za-z_]{2,}"
_TOKEN = re.compile(
    rf"<(?:(?P<name>{_NAME})"
    rf"|(?P<modifier>basename_x|basename|posix|upper|lower|pad) +(?P<arg>{_NAME})(?: +(?P<width>[0-9]+))?)>"
)
_QUOTED_LIST = re.compile(r'"[^"]*"(?: +"[^"]*")*')
_QUOTED = re.compile(r'"([^"]*)"')
_INTEGER = re.compile(r"([+-]?)([0-9]+)")


class TemplateError(TokenError):
    """A TokenError that says where: the template's name, the line and the 1-based column."""

    def __init__(self, message: str, *, where: str, line: int, column: int, token: str | None = None) -> None:
        super().__init__(message)
        self.where = where
        self.line = line
        self.column = column
        self.token = token


@dataclass(frozen=True)
class _Token:
    name: str  # the token whose value is used (a modifier's argument)
    modifier: str | None
    width: int | None
    position: int
    raw: str


def render(
    template: str,
    values: Mapping[str, str],
    *,
    where: str = "task template",
    scope: Scope = Scope.TILE,
) -> str:
    """Substitute every token of ``template`` from ``values``.

    A token of the table whose scope is narrower than ``scope`` is an error, as is a token with no
    value. Names outside the table are allowed when ``values`` holds them.
    """
    out: list[str] = []
    for part in _parse(template, where):
        if isinstance(part, str):
            out.append(part)
        else:
            out.append(_apply(part, _lookup(part, template, values, where, scope), template, where))
    return "".join(out)


def tokens_in(template: str, *, where: str = "task template") -> list[str]:
    """The token names a template uses (a modifier's argument included), first use first."""
    names: dict[str, None] = {}
    for part in _parse(template, where):
        if isinstance(part, _Token):
            names.setdefault(part.name)
    return list(names)


def chunk_values(chunk: FrameSet, image_frames: Sequence[tuple[str, FrameSet]]) -> dict[str, str]:
    """The task tokens that depend only on frames: sources, chunks, chunklength/start/end.

    Each image renders ``chunk ∩ its frames``; an image with nothing in the chunk is left out of
    both ``sources`` and ``chunks``, which stay in the same order.
    """
    if not chunk:
        raise FrameSpecError("a task's chunk has no frames")
    sources: list[str] = []
    specs: list[str] = []
    for image, frames in image_frames:
        part = chunk.intersect(frames)
        if part:
            sources.append(image)
            specs.append(f"'{part.cnode()}'")
    if not sources:
        raise FrameSpecError(f"no image renders any frame of chunk {chunk}: check the images' frame ranges")
    return {
        "sources": " ".join(sources),
        "chunks": " ".join(specs),
        "chunklength": str(len(chunk)),
        "chunkstart": str(chunk.first),
        "chunkend": str(chunk.last),
    }


# -- parsing --------------------------------------------------------------------------------------


def _parse(template: str, where: str) -> list[str | _Token]:
    if not isinstance(template, str):
        raise TokenError(f"the {where} must be text, not {type(template).__name__}")
    parts: list[str | _Token] = []
    literal: list[str] = []
    i = 0
    while True:
        j = template.find("<", i)
        if j < 0:
            literal.append(template[i:])
            break
        literal.append(template[i:j])
        if template.startswith("<<", j):
            literal.append("<")
            i = j + 2
            continue
        match = _TOKEN.match(template, j)
        if match is None:
            raise _syntax_error(template, j, where)
        modifier = match.group("modifier")
        width = match.group("width")
        if modifier == "pad" and width is None:
            raise _error(template, j, where, f"{match.group(0)} needs a digit count: write <pad {match.group('arg')} N>")
        if modifier is not None and modifier != "pad" and width is not None:
            raise _error(
                template, j, where, f"{match.group(0)} takes no number: write <{modifier} {match.group('arg')}>"
            )
        if width is not None and not 1 <= int(width) <= MAX_PAD:
            raise _error(template, j, where, f"{match.group(0)}: the digit count must be from 1 to {MAX_PAD}")
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(
            _Token(
                name=match.group("name") or match.group("arg"),
                modifier=modifier,
                width=int(width) if width is not None else None,
                position=j,
                raw=match.group(0),
            )
        )
        i = match.end()
    if any(literal):
        parts.append("".join(literal))
    return parts


def _syntax_error(template: str, position: int, where: str) -> TemplateError:
    end = template.find(">", position + 1)
    body = template[position + 1 : end] if end >= 0 else ""
    if end < 0 or "<" in body or "\n" in body:
        return _error(template, position, where, "this '<' starts no token; write '<<' for a literal '<'")
    words = body.split(" ")
    if words[0] in MODIFIERS:
        form = f"<{words[0]} name N>" if words[0] == "pad" else f"<{words[0]} name>"
        return _error(
            template,
            position,
            where,
            f"<{body}> is not a {words[0]} modifier: write {form}, where name is a token "
            "(letters and underscores); write '<<' for a literal '<'",
        )
    if re.fullmatch(r"[A-Za-z_]", body):
        return _error(
            template, position, where, f"<{body}> is too short for a token name (at least two letters); "
            "write '<<' for a literal '<'"
        )
    return _error(
        template,
        position,
        where,
        f"<{body}> is not a token (a name of letters and underscores, or a modifier such as "
        "<upper name>); write '<<' for a literal '<'",
    )


def _lookup(token: _Token, template: str, values: Mapping[str, str], where: str, scope: Scope) -> str:
    name = token.name
    token_scope = TOKENS.get(name)
    if token_scope is not None and token_scope > scope:
        raise _error(
            template,
            token.position,
            where,
            f"<{name}> is a {token_scope.label}-scope token: it has no single value in a "
            f"{scope.label}-scope template",
            token=name,
        )
    if name in values:
        value = values[name]
        if not isinstance(value, str):
            raise TypeError(f"the value of token {name!r} must be a string, not {type(value).__name__}")
        return value
    if token_scope is not None:
        raise _error(template, token.position, where, f"<{name}> has no value here", token=name)
    known = sorted(set(TOKENS) | set(values))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean <{close[0]}>?)" if close else ""
    raise _error(
        template,
        token.position,
        where,
        f"unknown token <{name}>{hint}; write '<<' for a literal '<'",
        token=name,
    )


def _apply(token: _Token, value: str, template: str, where: str) -> str:
    modifier = token.modifier
    if modifier is None:
        return value
    if modifier == "upper":
        return value.upper()
    if modifier == "lower":
        return value.lower()
    if modifier == "pad":
        match = _INTEGER.fullmatch(value.strip())
        if match is None:
            raise _error(
                template, token.position, where, f"{token.raw}: value {value!r} of <{token.name}> is not a whole number",
                token=token.name,
            )
        number = int(value)
        digits = str(abs(number)).zfill(token.width or 1)
        return f"-{digits}" if number < 0 else digits
    if modifier == "posix":
        return _each_path(value, posix_path)
    if modifier == "basename":
        return _each_path(value, _basename)
    return _each_path(value, lambda path: posixpath.splitext(_basename(path))[0])


def _basename(path: str) -> str:
    text = posix_path(path)
    stripped = text.rstrip("/")
    return posixpath.basename(stripped) if stripped else text


def _each_path(value: str, transform: Callable[[str], str]) -> str:
    """Apply to each double-quoted path of a quoted list, else to the whole value."""
    if _QUOTED_LIST.fullmatch(value):
        return _QUOTED.sub(lambda m: '"' + transform(m.group(1)) + '"', value)
    return transform(value)


def _error(template: str, position: int, where: str, problem: str, *, token: str | None = None) -> TemplateError:
    line = template.count("\n", 0, position) + 1
    column = position - (template.rfind("\n", 0, position) + 1) + 1
    place = f"column {column}" if "\n" not in template else f"line {line}, column {column}"
    return TemplateError(f"{where}, {place}: {problem}", where=where, line=line, column=column, token=token)
