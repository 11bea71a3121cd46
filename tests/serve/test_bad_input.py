"""Bad input: every refused request gets a 4xx with a clear JSON error, and the store is left exactly as it was."""

from __future__ import annotations

import pytest
from tests.serve.harness import snapshot

CHAT = "/v1/chat/completions"


def ok_chat(model: str, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "user": "alice",
        "max_tokens": 4,
        **extra,
    }


@pytest.fixture
def seeded(client):
    """A store with some data of alice's and bob's, so that 'nothing written' is checked against a non-empty state."""
    h = client.harness
    client.post(
        "/v1/memory/scopes/alice/turns", headers=h.headers(), json={"turns": [{"content": "Ada, Lisbon"}]}
    )
    client.post(
        "/v1/memory/scopes/bob/turns", headers=h.headers(h.bob_key), json={"turns": [{"content": "Bob"}]}
    )
    return client


def expect_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert err["message"] and isinstance(err["message"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


CASES = [
    # (name, method, path, kwargs builder, status, code, param)
    (
        "malformed json",
        "post",
        CHAT,
        lambda h: {"content": b'{"model": "x", "messages": [', "headers": h.headers()},
        400,
        "invalid_json",
        None,
    ),
    (
        "empty body",
        "post",
        CHAT,
        lambda h: {"content": b"", "headers": h.headers()},
        400,
        "invalid_json",
        None,
    ),
    (
        "json array",
        "post",
        CHAT,
        lambda h: {"json": [1, 2], "headers": h.headers()},
        400,
        "invalid_value",
        None,
    ),
    (
        "messages not a list",
        "post",
        CHAT,
        lambda h: {"json": {**ok_chat(h.model), "messages": "hi"}, "headers": h.headers()},
        400,
        "invalid_value",
        "messages",
    ),
    (
        "max_tokens as string",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, max_tokens="4"), "headers": h.headers()},
        400,
        "invalid_value",
        "max_tokens",
    ),
    (
        "temperature out of range",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, temperature=5), "headers": h.headers()},
        400,
        "invalid_value",
        "temperature",
    ),
    (
        "bad role",
        "post",
        CHAT,
        lambda h: {
            "json": {**ok_chat(h.model), "messages": [{"role": "wizard", "content": "x"}]},
            "headers": h.headers(),
        },
        400,
        "invalid_value",
        None,
    ),
    (
        "no messages",
        "post",
        CHAT,
        lambda h: {"json": {**ok_chat(h.model), "messages": []}, "headers": h.headers()},
        400,
        "invalid_value",
        "messages",
    ),
    (
        "n=2",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, n=2), "headers": h.headers()},
        400,
        "invalid_value",
        None,
    ),
    (
        "tools",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, tools=[{"type": "function"}]), "headers": h.headers()},
        400,
        "invalid_value",
        None,
    ),
    (
        "image content",
        "post",
        CHAT,
        lambda h: {
            "json": {
                **ok_chat(h.model),
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "headers": h.headers(),
        },
        400,
        "invalid_value",
        None,
    ),
    (
        "max_tokens over the limit",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, max_tokens=10_000), "headers": h.headers()},
        400,
        "max_tokens_too_large",
        "max_tokens",
    ),
    (
        "prompt too long",
        "post",
        CHAT,
        lambda h: {
            "json": {**ok_chat(h.model), "messages": [{"role": "user", "content": "lives " * 5000}]},
            "headers": h.headers(),
        },
        400,
        "context_length_exceeded",
        "messages",
    ),
    (
        "unknown model",
        "post",
        CHAT,
        lambda h: {"json": {**ok_chat(h.model), "model": "gpt-4o"}, "headers": h.headers()},
        404,
        "model_not_found",
        "model",
    ),
    ("missing key", "post", CHAT, lambda h: {"json": ok_chat(h.model)}, 401, "missing_api_key", None),
    (
        "wrong key",
        "post",
        CHAT,
        lambda h: {
            "json": ok_chat(h.model),
            "headers": {"Authorization": "Bearer msk_000000000000_" + "a" * 43},
        },
        401,
        "invalid_api_key",
        None,
    ),
    (
        "not bearer",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model), "headers": {"Authorization": h.key}},
        401,
        "invalid_api_key",
        None,
    ),
    (
        "another user's scope (user field)",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, user="bob"), "headers": h.headers()},
        403,
        "scope_forbidden",
        "scope",
    ),
    (
        "another user's scope (header)",
        "post",
        CHAT,
        lambda h: {
            "json": {k: v for k, v in ok_chat(h.model).items() if k != "user"},
            "headers": {**h.headers(), "X-Memsplice-Scope": "bob"},
        },
        403,
        "scope_forbidden",
        "scope",
    ),
    (
        "user and header disagree",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model), "headers": {**h.headers(), "X-Memsplice-Scope": "alice:x"}},
        400,
        "conflicting_scope",
        "user",
    ),
    (
        "invalid scope id",
        "post",
        CHAT,
        lambda h: {"json": ok_chat(h.model, user="alice bob"), "headers": h.headers(h.admin_key)},
        400,
        "invalid_scope",
        "scope",
    ),
    (
        "write to another user's scope",
        "post",
        "/v1/memory/scopes/bob/turns",
        lambda h: {"json": {"turns": [{"content": "x"}]}, "headers": h.headers()},
        403,
        "scope_forbidden",
        "scope",
    ),
    (
        "read another user's spans",
        "get",
        "/v1/memory/scopes/bob/spans",
        lambda h: {"headers": h.headers()},
        403,
        "scope_forbidden",
        None,
    ),
    (
        "export another user's scope",
        "get",
        "/v1/memory/scopes/bob/export",
        lambda h: {"headers": h.headers()},
        403,
        "scope_forbidden",
        None,
    ),
    (
        "delete another user's scope",
        "delete",
        "/v1/memory/scopes/bob",
        lambda h: {"headers": h.headers()},
        403,
        "scope_forbidden",
        None,
    ),
    (
        "import into another user's scope",
        "post",
        "/v1/memory/scopes/bob/import",
        lambda h: {"json": {"format": "memsplice.scope", "version": 1}, "headers": h.headers()},
        403,
        "scope_forbidden",
        None,
    ),
    (
        "turns with wrong type",
        "post",
        "/v1/memory/scopes/alice/turns",
        lambda h: {"json": {"turns": [{"role": "user", "content": 42}]}, "headers": h.headers()},
        400,
        "invalid_value",
        "turns.0.content",
    ),
    (
        "empty turns",
        "post",
        "/v1/memory/scopes/alice/turns",
        lambda h: {"json": {"turns": []}, "headers": h.headers()},
        400,
        "invalid_value",
        "turns",
    ),
    (
        "too many turns",
        "post",
        "/v1/memory/scopes/alice/turns",
        lambda h: {"json": {"turns": [{"content": "x"}] * 65}, "headers": h.headers()},
        400,
        "too_many_turns",
        "turns",
    ),
    (
        "turn too long",
        "post",
        "/v1/memory/scopes/alice/text",
        lambda h: {"json": {"text": "x" * 40_000}, "headers": h.headers()},
        400,
        "turn_too_long",
        None,
    ),
    (
        "import not an export",
        "post",
        "/v1/memory/scopes/alice:new/import",
        lambda h: {"json": {"format": "something"}, "headers": h.headers()},
        400,
        "invalid_import",
        None,
    ),
    (
        "import malformed json",
        "post",
        "/v1/memory/scopes/alice:new/import",
        lambda h: {"content": b"{", "headers": h.headers()},
        400,
        "invalid_json",
        None,
    ),
    (
        "import over an existing scope",
        "post",
        "/v1/memory/scopes/alice/import",
        lambda h: {"json": {"format": "memsplice.scope", "version": 1, "spans": []}, "headers": h.headers()},
        409,
        "scope_exists",
        None,
    ),
    (
        "limit not a number",
        "get",
        "/v1/memory/scopes/alice/spans",
        lambda h: {"params": {"limit": "many"}, "headers": h.headers()},
        400,
        "invalid_value",
        None,
    ),
    ("unknown route", "get", "/v1/nothing", lambda h: {"headers": h.headers()}, 404, "not_found", None),
]


@pytest.mark.parametrize("name,method,path,build,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_refused_and_nothing_written(seeded, name, method, path, build, status, code, param):
    h = seeded.harness
    before = snapshot(h.store)
    response = getattr(seeded, method)(path, **build(h))
    expect_error(response, status, code, param)
    assert snapshot(h.store) == before


def test_oversized_body_by_content_length(seeded):
    h = seeded.harness
    before = snapshot(h.store)
    big = b'{"turns": [{"content": "' + b"x" * (h.config.max_body_bytes + 10) + b'"}]}'
    expect_error(
        seeded.post("/v1/memory/scopes/alice/turns", content=big, headers=h.headers()),
        413,
        "request_too_large",
    )
    assert snapshot(h.store) == before


def test_oversized_chunked_body(seeded):
    """A body sent without Content-Length is counted while it is read and refused once over the limit."""
    h = seeded.harness
    before = snapshot(h.store)

    def chunks():
        yield b'{"turns": [{"content": "'
        for _ in range(h.config.max_body_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}]}'

    r = seeded.post("/v1/memory/scopes/alice/turns", content=chunks(), headers=h.headers())
    expect_error(r, 413, "request_too_large")
    assert snapshot(h.store) == before


def test_revoked_key_is_refused_at_once(seeded):
    h = seeded.harness
    key_id = h.store.verify_key(h.bob_key).key_id
    assert seeded.get("/v1/memory/scopes/bob", headers=h.headers(h.bob_key)).status_code == 200
    h.store.revoke_key(key_id)
    expect_error(seeded.get("/v1/memory/scopes/bob", headers=h.headers(h.bob_key)), 401, "invalid_api_key")
