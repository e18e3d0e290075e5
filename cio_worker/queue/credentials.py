"""Bearer tokens for the coordinator: their form, their digest, their scopes.

A token reads ``cio_<id>_<secret>``: the id finds its row, the secret (32 random bytes) is stored
only as its SHA-256 digest (the secret has the full entropy of a key, so a slow password hash would
add nothing) and compared in constant time. Scopes: ``agent`` claims and reports on its own leases;
``owner`` submits, reads status, releases, kills and downloads. A token may carry both.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cio_worker.errors import CioError

SCOPES = ("agent", "owner")
_FORM = re.compile(r"^cio_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class TokenError(CioError, ValueError):
    code = "bad_token"


@dataclass(frozen=True)
class TokenRow:
    id: str
    name: str
    scopes: frozenset[str]
    created: float
    revoked: float | None
    last_used: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(frozen=True)
class NewToken:
    id: str
    text: str  # shown once, never stored
    digest: str


def check_scopes(scopes: object) -> frozenset[str]:
    if isinstance(scopes, str):
        scopes = [s for s in scopes.replace(",", " ").split() if s]
    if not isinstance(scopes, (list, tuple, set, frozenset)) or not scopes:
        raise TokenError(f"a token needs at least one scope ({', '.join(SCOPES)})")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise TokenError(f"unknown scope {unknown[0]!r} (use {' or '.join(SCOPES)})")
    return frozenset(scopes)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or any(c.isspace() and c != " " for c in name):
        raise TokenError("a token's name must be 1 to 100 characters on one line (e.g. the fleet or person it is for)")
    return name.strip()


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def new_token() -> NewToken:
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewToken(id=token_id, text=f"cio_{token_id}_{secret}", digest=digest(secret))


def split(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, or None."""
    match = _FORM.match(text) if isinstance(text, str) else None
    return (match.group(1), match.group(2)) if match else None


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)
