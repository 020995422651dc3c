"""The edge functions' security rules (issue 16 item 9), against the real functions under Deno and a
database set up as Supabase sets one up: tokens, JWT claims, service-only functions, body limits, CORS."""

from __future__ import annotations

import hashlib
import uuid

import httpx
import psycopg
import pytest
from supabase_fixtures import CORS_ORIGIN, JWT_SECRET, EdgeFunctions, SupabaseUser, add_user, make_jwt

pytestmark = pytest.mark.postgres


@pytest.fixture
def fn(edge_functions: EdgeFunctions, clean_supabase: str) -> EdgeFunctions:
    return edge_functions


@pytest.fixture
def alice(clean_supabase: str) -> SupabaseUser:
    return add_user(clean_supabase, "alice")


def create(fn: EdgeFunctions, user: SupabaseUser, token: str):
    return fn.post(
        "create-task", {"task_type": "t2v", "params": {}, "project_id": user.project_id}, token=token
    )


def test_access_tokens_are_stored_as_digests_and_expire(fn: EdgeFunctions, clean_supabase: str, alice):
    with psycopg.connect(clean_supabase, autocommit=True) as conn:
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'user_api_tokens'"
        )]  # fmt: skip
        stored = conn.execute("SELECT token_sha256 FROM user_api_tokens").fetchall()
        assert "token" not in columns and stored == [
            (hashlib.sha256(alice.access_token.encode()).hexdigest(),)
        ]
        assert create(fn, alice, alice.access_token).status_code == 200

        expired = f"pat_{uuid.uuid4().hex}"
        conn.execute(
            "INSERT INTO user_api_tokens (token_sha256, user_id, expires_at) VALUES (%s, %s, now() - interval '1 s')",
            (hashlib.sha256(expired.encode()).hexdigest(), alice.user_id),
        )
    refused = create(fn, alice, expired)
    assert refused.status_code == 403 and "expired" in refused.json()["error"]
    # The digest itself is not a token.
    assert create(fn, alice, hashlib.sha256(alice.access_token.encode()).hexdigest()).status_code == 403


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"role": "authenticated", "aud": "authenticated"}, "no exp"),
        ({"role": "authenticated", "exp": 4_000_000_000}, 'aud "authenticated"'),
        ({"role": "authenticated", "aud": "other", "exp": 4_000_000_000}, 'aud "authenticated"'),
        ({"role": "authenticated", "aud": "authenticated", "exp": 1_000}, "expired"),
        (
            {"role": "authenticated", "aud": "authenticated", "exp": 4_000_000_000, "nbf": 4_000_000_000},
            "nbf",
        ),
        ({"role": "service_role"}, "no exp"),
    ],
)
def test_jwts_need_expiry_and_audience(fn: EdgeFunctions, alice: SupabaseUser, claims: dict, problem: str):
    token = make_jwt({"sub": alice.user_id, **claims}, JWT_SECRET)
    refused = create(fn, alice, token)
    assert refused.status_code == 403 and problem in refused.json()["error"]


def test_a_well_formed_user_jwt_is_accepted(fn: EdgeFunctions, alice: SupabaseUser):
    assert create(fn, alice, alice.jwt).status_code == 200


def test_a_near_miss_service_key_is_refused(fn: EdgeFunctions, alice: SupabaseUser):
    near = fn.service_key[:-1] + ("A" if fn.service_key[-1] != "A" else "B")
    assert create(fn, alice, near).status_code == 403


@pytest.mark.parametrize("name", ["requeue-stale-tasks", "start-task", "update-task-status"])
def test_lifecycle_functions_are_service_only(fn: EdgeFunctions, alice: SupabaseUser, name: str):
    task_id = create(fn, alice, alice.jwt).json()["id"]
    body = {"older_than_s": 0, "task_id": task_id, "worker_id": "w", "status": "In Progress"}
    for token in (alice.jwt, alice.access_token):
        refused = fn.post(name, body, token=token)
        assert refused.status_code == 403 and "service key" in refused.json()["error"]
    assert fn.post("get-task", {"task_id": task_id}).json()["status"] == "Queued"  # nothing changed
    assert fn.post(name, body).status_code == 200  # the service key may


def call(fn: EdgeFunctions, name: str, token: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    return httpx.post(f"{fn.url}/functions/v1/{name}", headers=headers, timeout=60, **kwargs)


def test_bodies_are_limited_before_decoding(fn: EdgeFunctions, alice: SupabaseUser):
    big = b'{"task_type": "t2v", "project_id": "%s", "params": {"prompt": "' % alice.project_id.encode()
    big += b"x" * (1024 * 1024) + b'"}}'
    declared = call(fn, "create-task", alice.jwt, content=big)
    assert declared.status_code == 413 and declared.json()["field"] == "body"

    def chunks():  # no Content-Length: the limit must hold on the bytes actually read
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    chunked = call(fn, "create-task", alice.jwt, content=chunks())
    assert chunked.status_code == 413
    assert fn.post("list-tasks", {}).json() == []  # nothing was created
    small = big.replace(b"x" * (1024 * 1024), b"a cat")
    assert call(fn, "create-task", alice.jwt, content=small).status_code == 200


def test_cors_only_for_configured_origins(fn: EdgeFunctions, alice: SupabaseUser):
    allowed = call(fn, "list-tasks", alice.jwt, json={}, headers={"Origin": CORS_ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = call(fn, "list-tasks", alice.jwt, json={}, headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in call(fn, "list-tasks", alice.jwt, json={}).headers
