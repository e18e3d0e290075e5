"""Web sessions: their ids, the digests the database keeps, the CSRF tokens derived from them, and
the cookies that carry them."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

SESSION_COOKIE = "cio_session"
SIGN_IN_COOKIE = "cio_sign_in"  # the sign-in form's CSRF token, before there is a session
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class SessionConfig:
    lifetime: float = 12 * 3600.0  # a session ends this long after sign-in


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def digest(session_id: str) -> str:
    """What the database keeps of a session id: its SHA-256 (the id has a key's entropy)."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


def csrf_token(session_id: str) -> str:
    """The CSRF token of a session: only someone who holds the session id can compute it, and a
    page of the view is the only place it is written."""
    return hmac.new(session_id.encode("ascii", "replace"), b"cio-web-csrf", hashlib.sha256).hexdigest()


def same(given: str | None, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(str(given).encode(), expected.encode())


def cookie(name: str, value: str, *, secure: bool, max_age: int | None) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Strict, Secure over TLS; ``max_age`` 0 deletes it."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
