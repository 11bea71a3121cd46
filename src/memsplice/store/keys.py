"""API keys: generation, hashing, parsing, and the scope patterns a key may touch.

A key reads `msk_<key_id>_<secret>`: `key_id` (12 hex characters) is stored in the clear to find the key's row,
the 256-bit `secret` only as sha256(salt || secret) with a random 16-byte salt per key. A slow hash (scrypt) would
protect low-entropy passwords; a 256-bit random secret cannot be guessed, so one fast salted hash per request is
enough, and verification compares digests in constant time.

Scope patterns are shell-style (`fnmatch`, case-sensitive): "alice" allows exactly that scope, "team-a:*" every
scope under it, "*" all scopes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "msk_"
_KEY_RE = re.compile(r"^msk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
SCOPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
"""Allowed scope ids: 1-128 letters, digits and ._:@+- , starting with a letter or digit (":" namespaces)."""


@dataclass(frozen=True)
class ApiKey:
    """A key as the server sees it after verification (never the secret)."""

    key_id: str
    name: str
    scopes: tuple[str, ...]

    def may_touch(self, scope: str) -> bool:
        return any(fnmatch.fnmatchcase(scope, pattern) for pattern in self.scopes)


def new_key() -> tuple[str, str, str]:
    """A fresh key: (full key to hand out once, key_id, secret)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}{key_id}_{secret}", key_id, secret


def parse_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    m = _KEY_RE.match(key or "")
    return (m.group(1), m.group(2)) if m else None


def digest_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def secret_matches(secret: str, salt: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(digest_secret(secret, salt), digest)


def validate_scope(scope: str) -> str:
    """`scope` if it is a valid scope id, else ValueError naming the rule."""
    if not isinstance(scope, str) or not SCOPE_RE.match(scope):
        raise ValueError(
            f"invalid scope {scope!r}: use 1-128 letters, digits or ._:@+- , starting with a letter or digit"
        )
    return scope


def validate_patterns(patterns: list[str]) -> tuple[str, ...]:
    if not patterns:
        raise ValueError("a key needs at least one scope pattern (e.g. 'alice', 'team-a:*' or '*')")
    for p in patterns:
        if not isinstance(p, str) or not p or len(p) > 128:
            raise ValueError(f"invalid scope pattern {p!r}")
    return tuple(patterns)
