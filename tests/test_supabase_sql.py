"""Supabase schema: migrations, row-level security with Supabase's own roles, and the SQL functions.

RLS is exercised for real: each check runs in a transaction under `SET LOCAL ROLE authenticated` with
`request.jwt.claims` set, exactly as PostgREST and our edge functions do for a user's request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.rows import dict_row
from supabase_fixtures import SupabaseUser, add_user

from db.models import TaskStatus
from db.store import InvalidTask, TaskConflict, TaskNotFound, TaskStoreError
from db.supabase_store import SupabaseTaskStore, supabase_migrations


@contextmanager
def session_as(db_url: str, role: str, user_id: str | None = None) -> Iterator[psycopg.Connection]:
    """A transaction running as a Supabase role, with the JWT claims a request of that user carries."""
    claims = {"role": role} | ({"sub": user_id} if user_id else {})
    with psycopg.connect(db_url, row_factory=dict_row) as conn, conn.transaction():
        conn.execute(
            "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
            (role, json.dumps(claims)),
        )
        yield conn


def create_as(db_url: str, user: SupabaseUser, **fields) -> dict:
    with session_as(db_url, "authenticated", user.user_id) as conn:
        return conn.execute(
            "SELECT * FROM create_task(%s, %s::jsonb, NULL, NULL, %s)",
            (
                fields.get("task_type", "t2v"),
                json.dumps(fields.get("params", {})),
                fields.get("project_id", user.project_id),
            ),
        ).fetchone()


@pytest.fixture
def two_users(clean_supabase: str) -> tuple[SupabaseUser, SupabaseUser]:
    return add_user(clean_supabase, "alice"), add_user(clean_supabase, "bob")


# --- migrations ------------------------------------------------------------------------------------


def test_migrations_apply_to_an_empty_schema_and_reapply_cleanly(supabase_db: str):
    schema = f"hwgp_supa_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(supabase_db, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"supabase+{supabase_db}?options=-csearch_path%3D{schema}"
    try:
        with SupabaseTaskStore(url) as store:
            applied = store.migrate()
            assert applied == ["0001_tasks", "0002_task_functions", "0003_result"] + [
                v for v, _ in supabase_migrations()
            ]
            assert store.migrate() == []
            task = store.add("t2v", {"x": 1})
        # The scripts themselves are idempotent: running them again changes nothing and loses nothing.
        with psycopg.connect(url.removeprefix("supabase+"), autocommit=True) as conn:
            for _, sql in supabase_migrations():
                conn.execute(sql.encode())
            policies = conn.execute(
                "SELECT count(*) FROM pg_policies WHERE schemaname = %s AND tablename = 'tasks'", (schema,)
            ).fetchone()[0]
            rls = conn.execute(
                "SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass", (f"{schema}.tasks",)
            ).fetchone()[0]
        assert policies == 4 and rls is True
        with SupabaseTaskStore(url) as store:
            assert store.get(task.id).params == {"x": 1}
    finally:
        with psycopg.connect(supabase_db, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_migrating_a_database_without_supabase_roles_says_what_is_missing(pg_schema_url: str):
    # The `test` database has no auth schema: Supabase migrations must refuse, naming auth.uid().
    store = SupabaseTaskStore("supabase+" + pg_schema_url)
    try:
        with pytest.raises(TaskStoreError, match=r"not a Supabase database: missing .*auth\.uid\(\)"):
            store.migrate()
    finally:
        store.close()


# --- row-level security --------------------------------------------------------------------------------


def test_a_user_sees_and_creates_only_tasks_of_their_own_projects(clean_supabase: str, two_users):
    alice, bob = two_users
    a = create_as(clean_supabase, alice, params={"owner": "alice"})
    b = create_as(clean_supabase, bob, params={"owner": "bob"})
    with session_as(clean_supabase, "authenticated", alice.user_id) as conn:
        assert [r["id"] for r in conn.execute("SELECT id FROM tasks")] == [a["id"]]
        assert [r["id"] for r in conn.execute("SELECT id FROM list_tasks()")] == [a["id"]]
        with pytest.raises(psycopg.errors.NoDataFound):
            conn.execute("SELECT * FROM get_task(%s)", (b["id"],))
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="not one of your projects"),
        session_as(clean_supabase, "authenticated", alice.user_id) as conn,
    ):
        conn.execute("SELECT * FROM create_task('t2v', '{}'::jsonb, NULL, NULL, %s)", (bob.project_id,))
    with session_as(clean_supabase, "service_role") as conn:
        assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 2


def test_a_user_can_neither_claim_nor_complete_nor_update_another_users_task(clean_supabase: str, two_users):
    alice, bob = two_users
    b = create_as(clean_supabase, bob)
    with session_as(clean_supabase, "authenticated", alice.user_id) as conn:
        assert conn.execute("SELECT * FROM claim_next_task('alice-worker', NULL, NULL, 10)").fetchall() == []
    with session_as(clean_supabase, "authenticated", bob.user_id) as conn:
        [claimed] = conn.execute("SELECT * FROM claim_next_task('bob-worker')").fetchall()
        assert claimed["id"] == b["id"] and claimed["worker_id"] == "bob-worker"
    with (
        pytest.raises(psycopg.errors.NoDataFound),
        session_as(clean_supabase, "authenticated", alice.user_id) as conn,
    ):
        conn.execute("SELECT * FROM complete_task(%s, 'https://evil/x.mp4')", (b["id"],))
    with session_as(clean_supabase, "authenticated", alice.user_id) as conn:
        updated = conn.execute("UPDATE tasks SET status = 'Complete' WHERE id = %s", (b["id"],)).rowcount
        assert updated == 0
        # Nor move her own task into Bob's project.
        mine = conn.execute(
            "SELECT * FROM create_task('t2v', '{}'::jsonb, NULL, NULL, %s)", (alice.project_id,)
        )
        mine_id = mine.fetchone()["id"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE tasks SET project_id = %s WHERE id = %s", (bob.project_id, mine_id))
    with SupabaseTaskStore("supabase+" + clean_supabase) as store:
        task = store.get(b["id"])
    assert (
        task.status == TaskStatus.IN_PROGRESS
        and task.worker_id == "bob-worker"
        and task.output_location is None
    )


def test_service_role_claims_every_project_and_anon_sees_nothing(clean_supabase: str, two_users):
    alice, bob = two_users
    ids = {create_as(clean_supabase, alice)["id"], create_as(clean_supabase, bob)["id"]}
    with session_as(clean_supabase, "service_role") as conn:
        claimed = conn.execute("SELECT * FROM claim_next_task('service-worker', NULL, NULL, 10)").fetchall()
    assert {r["id"] for r in claimed} == ids
    with pytest.raises(psycopg.errors.InsufficientPrivilege), session_as(clean_supabase, "anon") as conn:
        conn.execute("SELECT * FROM tasks")
    # Users cannot read anybody's access tokens, their own included.
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        session_as(clean_supabase, "authenticated", alice.user_id) as conn,
    ):
        conn.execute("SELECT * FROM user_api_tokens")


def test_claims_without_a_subject_see_nothing(clean_supabase: str, two_users):
    create_as(clean_supabase, two_users[0])
    with session_as(clean_supabase, "authenticated") as conn:
        assert conn.execute("SELECT * FROM claim_next_task('w', NULL, NULL, 10)").fetchall() == []
        assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_project_scope_narrows_a_claim(clean_supabase: str, two_users):
    alice, bob = two_users
    create_as(clean_supabase, alice)
    b = create_as(clean_supabase, bob)
    with session_as(clean_supabase, "service_role") as conn:
        claimed = conn.execute(
            "SELECT * FROM claim_next_task('w', NULL, %s, 10)", ([bob.project_id],)
        ).fetchall()
    assert [r["id"] for r in claimed] == [b["id"]]


# --- the SQL functions behind the edge functions ----------------------------------------------------------


@pytest.fixture
def direct(clean_supabase: str) -> Iterator[SupabaseTaskStore]:
    with SupabaseTaskStore("supabase+" + clean_supabase) as store:
        yield store


def test_claim_is_one_statement_with_the_dependency_check_inside(direct: SupabaseTaskStore):
    first = direct.add("t2v", {})
    second = direct.add("vace", {}, dependant_on=first.id)
    with psycopg.connect(direct.url.removeprefix("supabase+")) as conn:
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'claim_next_task'").fetchone()[0]
    assert body.count("UPDATE tasks") == 1 and "FOR UPDATE OF t SKIP LOCKED" in body
    assert "AS MATERIALIZED" in body and "d.status = 'Complete'" in body
    assert [t.id for t in direct.claim_next("w", limit=5)] == [first.id]
    direct.complete(first.id, "https://x/first.mp4", worker_id="w")
    assert [t.id for t in direct.claim_next("w", limit=5)] == [second.id]


def test_predecessor_output(direct: SupabaseTaskStore):
    first = direct.add("t2v", {})
    second = direct.add("vace", {}, dependant_on=first.id)
    assert direct.predecessor_output(first.id) is None
    assert direct.predecessor_output(second.id) == {
        "predecessor_id": first.id,
        "output_location": None,
        "status": "Queued",
    }
    direct.claim_next("w")
    direct.complete(first.id, "https://x/first.mp4")
    assert direct.predecessor_output(second.id)["output_location"] == "https://x/first.mp4"
    with pytest.raises(TaskNotFound):
        direct.predecessor_output(str(uuid.uuid4()))


def test_completed_segments_of_a_run(direct: SupabaseTaskStore):
    def segment(index: int, run_key: str, run: str, *, done: bool = True, project: str | None = None) -> None:
        task = direct.add("travel_segment", {run_key: run, "segment_index": index}, project_id=project)
        direct.start(task.id, "w")
        if done:
            direct.complete(task.id, f"https://x/{run}_seg{index:02d}.mp4")

    segment(1, "orchestrator_run_id", "run1")
    segment(0, "run_id", "run1", project="p1")
    segment(2, "orchestrator_run_id", "run1", done=False)
    segment(0, "orchestrator_run_id", "run2")
    direct.add("travel_stitch", {"orchestrator_run_id": "run1", "segment_index": 3})
    assert direct.completed_segments("run1") == [
        {"segment_index": 0, "output_location": "https://x/run1_seg00.mp4"},
        {"segment_index": 1, "output_location": "https://x/run1_seg01.mp4"},
    ]
    assert direct.completed_segments("run1", project_id="p1") == [
        {"segment_index": 0, "output_location": "https://x/run1_seg00.mp4"}
    ]
    assert direct.completed_segments("nope") == []


def test_update_status_as_existing_clients_send_it(direct: SupabaseTaskStore):
    task = direct.add("t2v", {})
    dependant = direct.add("t2v", {}, dependant_on=task.id)
    running = direct.update_status(task.id, "In Progress")
    assert running.status == TaskStatus.IN_PROGRESS and running.generation_started_at is not None
    failed = direct.update_status(task.id, TaskStatus.FAILED, "CUDA out of memory")
    assert failed.output_location == failed.error_message == "CUDA out of memory"
    assert direct.get(dependant.id).status == TaskStatus.FAILED  # failure propagates
    again = direct.update_status(task.id, "Queued")
    assert again.status == TaskStatus.QUEUED and again.output_location is None
    done = direct.update_status(task.id, "Complete", "https://x/out.mp4")
    assert done.status == TaskStatus.COMPLETE and done.output_location == "https://x/out.mp4"
    with pytest.raises(TaskConflict, match="Complete"):
        direct.update_status(task.id, "Failed", "late")
    with pytest.raises(InvalidTask) as info:
        direct.update_status(task.id, "Done")
    assert info.value.field == "status" and "'Done'" in str(info.value)
    with pytest.raises(TaskNotFound):
        direct.update_status(str(uuid.uuid4()), "Complete", "x")
