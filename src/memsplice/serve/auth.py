"""Who may touch which scope: API keys from the `Authorization: Bearer` header, checked against the store.

Guarantees: with auth on, every API route needs a live key (401 otherwise, with the reason), and every scope a
request names, in the path, the `user` field or the scope header, must match one of the key's scope patterns (403
otherwise). The check happens before the request body is acted on, so a refused request writes nothing. Keys are
looked up on every request, so revoking one takes effect at once. With auth off every scope is allowed (meant for
a server bound to loopback).
"""

from __future__ import annotations

import asyncio

from ..store import ApiKey, MemoryStore, validate_scope
from .schemas import APIError

ALL_SCOPES = ApiKey(key_id="-", name="auth disabled", scopes=("*",))


class Authenticator:
    def __init__(self, store: MemoryStore, enabled: bool = True):
        self.store = store
        self.enabled = enabled

    async def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an `Authorization` header value; APIError 401 when missing, malformed, unknown or revoked."""
        if not self.enabled:
            return ALL_SCOPES
        if not authorization:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "the Authorization header must read 'Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = await asyncio.to_thread(self.store.verify_key, token.strip())
        if key is None:
            raise APIError(
                401,
                "invalid or revoked API key",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return key

    @staticmethod
    def check_scope(key: ApiKey, scope: str) -> str:
        """`scope` when it is well formed and `key` may touch it; APIError 400 / 403 otherwise."""
        try:
            validate_scope(scope)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_scope", param="scope") from None
        if not key.may_touch(scope):
            raise APIError(
                403,
                f"this API key may not touch scope {scope!r}",
                type="permission_error",
                code="scope_forbidden",
                param="scope",
            )
        return scope
