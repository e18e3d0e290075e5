"""File identity: MD5 as base64 of the 16 digest bytes (contract.md 8), and hashstore keys."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from pathlib import Path

from cio_worker.errors import DocumentError

CHUNK = 1024 * 1024
_B64 = re.compile(r"[A-Za-z0-9+/]{22}==")
# The canonical base64 of 16 bytes: the last digit carries 2 bits, its 4 low bits are zero.
_CANONICAL = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")
_CANONICAL_RUN = re.compile(rf"(?:{_CANONICAL.pattern}\x00)*{_CANONICAL.pattern}")  # several, NUL-separated


def md5_b64_of_bytes(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def md5_b64_of_file(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode("ascii")


def b64_from_digest(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def check_md5_b64(value: object, field: str = "md5") -> str:
    """Validate base64 of exactly 16 bytes; return it unchanged."""
    if isinstance(value, str) and _CANONICAL.fullmatch(value):
        return value  # the common case, without decoding; the checks below explain a refusal
    if not isinstance(value, str):
        raise DocumentError(field, f"must be base64 text, not {type(value).__name__}")
    if not _B64.fullmatch(value):
        raise DocumentError(field, f"{value!r} is not base64 of a 16-byte MD5 digest")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError(field, f"{value!r} is not valid base64") from None
    if len(raw) != 16:
        raise DocumentError(field, f"{value!r} decodes to {len(raw)} bytes, not 16")
    # Stray bits in the last character still decode; such a value never equals a computed MD5.
    canonical = b64_from_digest(raw)
    if canonical != value:
        raise DocumentError(field, f"{value!r} is not the canonical base64 of its digest ({canonical!r})")
    return value


def all_canonical_md5_b64(values: list[object]) -> bool:
    """Whether every value passes ``check_md5_b64``: one match over all of them (a manifest of
    50,000 inputs); ``check_md5_b64`` says which one does not, and why."""
    if not values:
        return True
    try:
        text = "\x00".join(values)  # type: ignore[arg-type]  # TypeError: one is not text
    except TypeError:
        return False
    return len(text) == 25 * len(values) - 1 and _CANONICAL_RUN.fullmatch(text) is not None


def md5_hex(md5_b64: str) -> str:
    return base64.b64decode(md5_b64).hex()


def md5_b64_from_hex(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def hashstore_key(md5_b64: str) -> str:
    """The object key (relative to a storage root) of a content: ``hashstore/<32 hex digits>``."""
    return f"hashstore/{md5_hex(md5_b64)}"
