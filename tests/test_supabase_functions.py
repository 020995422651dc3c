"""The Supabase edge functions, served by Deno on a loopback port against a real database.

Each function of docs/compatibility.md's success path and documented errors (400/401/403/404/405), the three ways to
authenticate (service key, user JWT, personal access token), and concurrent claims through HTTP.
"""

from __future__ import annotations

import base64
import threading
import uuid

import httpx
import pytest
from supabase_fixtures import (
    ANON_KEY,
    JWT_SECRET,
    SERVICE_KEY,
    EdgeFunctions,
    StorageObjects,
    SupabaseUser,
    add_user,
    make_jwt,
)

from db.errors import TaskForbidden
from db.models import TaskStatus
from db.store import TaskStore, open_store
from db.supabase_store import HttpTransport, SupabaseTaskStore

FACTS_FUNCTIONS = (
    "claim-next-task",
    "complete-task",
    "create-task",
    "update-task-status",
    "get-predecessor-output",
    "get-completed-segments",
)


@pytest.fixture
def db(clean_supabase: str) -> str:
    return clean_supabase


@pytest.fixture
def fn(edge_functions: EdgeFunctions, db: str) -> EdgeFunctions:
    return edge_functions


@pytest.fixture
def direct(db: str):
    with SupabaseTaskStore("supabase+" + db) as store:
        yield store


@pytest.fixture
def alice(db: str) -> SupabaseUser:
    return add_user(db, "alice")


@pytest.fixture
def bob(db: str) -> SupabaseUser:
    return add_user(db, "bob")


# --- the original's functions (docs/compatibility.md): success paths ----------------------------------------


def test_create_then_claim_returns_the_facts_fields(fn: EdgeFunctions, direct: TaskStore):
    task_id = str(uuid.uuid4())
    created = fn.post(
        "create-task",
        {"task_id": task_id, "task_type": "t2v", "params": {"prompt": "a cat"}, "project_id": "p1"},
    )
    assert created.status_code == 200, created.text
    assert created.json()["task_id"] == task_id and created.json()["status"] == "Queued"

    claimed = fn.post("claim-next-task", {"worker_id": "gpu-1"})
    assert claimed.status_code == 200, claimed.text
    body = claimed.json()
    assert {k: body[k] for k in ("task_id", "params", "task_type", "project_id")} == {
        "task_id": task_id,
        "params": {"prompt": "a cat"},
        "task_type": "t2v",
        "project_id": "p1",
    }
    stored = direct.get(task_id)
    assert stored.status == TaskStatus.IN_PROGRESS and stored.worker_id == "gpu-1"
    empty = fn.post("claim-next-task", {"worker_id": "gpu-1"})
    assert empty.status_code == 204 and empty.content == b""


def test_create_task_accepts_params_as_a_json_string_and_a_dependency(fn: EdgeFunctions, direct: TaskStore):
    first = direct.add("t2v", {})
    answer = fn.post(
        "create-task", {"task_type": "vace", "params": '{"video_length": 81}', "dependant_on": first.id}
    )
    assert answer.status_code == 200, answer.text
    task = direct.get(answer.json()["task_id"])
    assert task.params == {"video_length": 81} and task.dependant_on == first.id


def test_complete_task_with_an_output_location(fn: EdgeFunctions, direct: TaskStore):
    task = direct.add("t2v", {})
    direct.claim_next("w")
    bad = fn.post(
        "complete-task", {"task_id": task.id, "output_location": "https://cdn/x.mp4", "result": [1]}
    )
    assert bad.status_code == 400 and bad.json()["field"] == "result"
    result = {"seed": 5, "timings": {"denoise": 2.5}}
    answer = fn.post(
        "complete-task", {"task_id": task.id, "output_location": "https://cdn/x.mp4", "result": result}
    )
    assert answer.status_code == 200, answer.text
    done = direct.get(task.id)
    assert done.status == TaskStatus.COMPLETE and done.output_location == "https://cdn/x.mp4"
    assert answer.json()["result"] == done.result == result


def test_complete_task_uploads_file_data_to_storage(
    fn: EdgeFunctions, direct: TaskStore, storage_objects: StorageObjects
):
    task = direct.add("t2v", {})
    direct.claim_next("w")
    video = b"\x00\x00\x00\x18ftypmp42 fake but bytes all the same"
    answer = fn.post(
        "complete-task",
        {"task_id": task.id, "file_data": base64.b64encode(video).decode(), "filename": "../my video?.mp4"},
    )
    assert answer.status_code == 200, answer.text
    url = f"{fn.url}/storage/v1/object/public/image_uploads/{task.id}/my_video_.mp4"
    assert answer.json()["output_location"] == url
    assert direct.get(task.id).output_location == url
    assert storage_objects.objects[f"image_uploads/{task.id}/my_video_.mp4"] == ("video/mp4", video)


def test_a_failed_upload_leaves_the_task_in_progress(
    fn: EdgeFunctions, direct: TaskStore, storage_objects: StorageObjects
):
    task = direct.add("t2v", {})
    direct.claim_next("w")
    storage_objects.fail_next = 1
    answer = fn.post("complete-task", {"task_id": task.id, "file_data": "aGVsbG8=", "filename": "out.png"})
    assert answer.status_code == 502 and "503" in answer.json()["error"]
    assert direct.get(task.id).status == TaskStatus.IN_PROGRESS
    # Nothing is uploaded for a task the caller may not complete.
    other = direct.add("t2v", {})
    refused = fn.post("complete-task", {"task_id": other.id, "file_data": "aGVsbG8=", "filename": "x.png"})
    assert refused.status_code == 409 and "Queued" in refused.json()["error"]
    assert not any(key.startswith(f"image_uploads/{other.id}/") for key in storage_objects.objects)


def test_update_task_status(fn: EdgeFunctions, direct: TaskStore):
    task = direct.add("t2v", {})
    dependant = direct.add("t2v", {}, dependant_on=task.id)
    answer = fn.post("update-task-status", {"task_id": task.id, "status": "In Progress"})
    assert answer.status_code == 200 and answer.json()["status"] == "In Progress"
    answer = fn.post(
        "update-task-status", {"task_id": task.id, "status": "Failed", "output_location": "OOM on step 3"}
    )
    assert answer.status_code == 200
    failed = direct.get(task.id)
    assert (
        failed.status == TaskStatus.FAILED
        and failed.output_location == failed.error_message == "OOM on step 3"
    )
    assert direct.get(dependant.id).status == TaskStatus.FAILED


def test_get_predecessor_output(fn: EdgeFunctions, direct: TaskStore):
    first = direct.add("t2v", {})
    second = direct.add("vace", {}, dependant_on=first.id)
    assert fn.post("get-predecessor-output", {"task_id": first.id}).json() is None
    direct.claim_next("w")
    direct.complete(first.id, "https://cdn/first.mp4")
    answer = fn.post("get-predecessor-output", {"task_id": second.id})
    assert answer.status_code == 200
    assert answer.json() == {
        "predecessor_id": first.id,
        "output_location": "https://cdn/first.mp4",
        "status": "Complete",
    }


def test_get_completed_segments(fn: EdgeFunctions, direct: TaskStore):
    for index in (1, 0):
        task = direct.add("travel_segment", {"orchestrator_run_id": "run-7", "segment_index": index})
        direct.start(task.id, "w")
        direct.complete(task.id, f"https://cdn/run-7_seg{index:02d}.mp4")
    direct.add("travel_segment", {"orchestrator_run_id": "run-7", "segment_index": 2})
    answer = fn.post("get-completed-segments", {"run_id": "run-7"})
    assert answer.status_code == 200
    assert answer.json() == [
        {"segment_index": 0, "output_location": "https://cdn/run-7_seg00.mp4"},
        {"segment_index": 1, "output_location": "https://cdn/run-7_seg01.mp4"},
    ]
    assert fn.post("get-completed-segments", {"run_id": "run-7", "project_id": "other"}).json() == []


# --- documented errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTS_FUNCTIONS)
def test_every_function_refuses_other_methods_and_missing_or_bad_tokens(fn: EdgeFunctions, name: str):
    url = f"{fn.url}/functions/v1/{name}"
    got = httpx.get(url, headers={"Authorization": f"Bearer {SERVICE_KEY}"})
    assert got.status_code == 405 and "POST" in got.json()["error"]
    assert fn.post(name, {}, token=None).status_code == 401
    basic = httpx.post(url, json={}, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401
    for token in (
        "pat_does_not_exist",
        make_jwt({"role": "service_role"}, "not-the-project-secret-at-all-really"),
        ANON_KEY,
    ):
        answer = fn.post(name, {}, token=token)
        assert answer.status_code == 403, (token, answer.text)


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("create-task", {"params": {}}, "task_type"),
        ("create-task", {"task_type": "t2v", "params": [1, 2]}, "params"),
        ("create-task", {"task_type": "t2v", "params": "{not json"}, "params"),
        ("create-task", {"task_type": "bad type!", "params": {}}, "task_type"),
        ("create-task", {"task_type": "t2v", "task_id": "123"}, "id"),
        ("create-task", {"task_type": "t2v", "dependant_on": str(uuid.uuid4())}, "dependant_on"),
        ("complete-task", {"output_location": "x"}, "task_id"),
        ("complete-task", {"task_id": "x"}, "file_data"),
        ("complete-task", {"task_id": "x", "file_data": "***", "filename": "a.mp4"}, "file_data"),
        ("update-task-status", {"task_id": "x", "status": "Done"}, "status"),
        ("update-task-status", {"task_id": "x"}, "status"),
        ("get-predecessor-output", {}, "task_id"),
        ("get-completed-segments", {"run_id": 7}, "run_id"),
        ("claim-next-task", {"task_types": "t2v"}, "task_types"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(
    fn: EdgeFunctions, direct: TaskStore, name: str, body: dict, field: str
):
    before = direct.count_by_status()
    answer = fn.post(name, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field and field in answer.json()["error"]
    assert direct.count_by_status() == before


def test_a_body_that_is_not_a_json_object_is_400(fn: EdgeFunctions):
    for content in (b"{oops", b"[1, 2]"):
        answer = httpx.post(
            f"{fn.url}/functions/v1/create-task",
            content=content,
            headers={"Authorization": f"Bearer {SERVICE_KEY}", "Content-Type": "application/json"},
        )
        assert answer.status_code == 400 and answer.json()["field"] == "body"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("complete-task", {"output_location": "https://cdn/x.mp4"}),
        ("update-task-status", {"status": "Complete", "output_location": "https://cdn/x.mp4"}),
        ("get-predecessor-output", {}),
    ],
)
def test_unknown_task_is_404(fn: EdgeFunctions, name: str, body: dict):
    missing = str(uuid.uuid4())
    answer = fn.post(name, body | {"task_id": missing})
    assert answer.status_code == 404 and missing in answer.json()["error"]


def test_completing_a_finished_task_is_409(fn: EdgeFunctions, direct: TaskStore):
    task = direct.add("t2v", {})
    direct.claim_next("w")
    direct.complete(task.id, "https://cdn/first.mp4")
    answer = fn.post("complete-task", {"task_id": task.id, "output_location": "https://cdn/again.mp4"})
    assert answer.status_code == 409 and "Complete" in answer.json()["error"]
    assert direct.get(task.id).output_location == "https://cdn/first.mp4"


# --- who may do what ----------------------------------------------------------------------------------


@pytest.mark.parametrize("credential", ["jwt", "access_token"])
def test_a_user_works_only_on_their_own_projects(
    fn: EdgeFunctions, direct: TaskStore, alice: SupabaseUser, bob: SupabaseUser, credential: str
):
    token = alice.jwt if credential == "jwt" else alice.access_token
    bobs = direct.add("t2v", {"owner": "bob"}, project_id=bob.project_id)
    # Not in her project: 403 on create; Bob's task is invisible to her (404), unclaimable (204).
    refused = fn.post("create-task", {"task_type": "t2v", "project_id": bob.project_id}, token=token)
    assert refused.status_code == 403 and refused.json()["field"] == "project_id"
    assert fn.post("claim-next-task", {"worker_id": "alice-gpu"}, token=token).status_code == 204
    assert fn.post("get-predecessor-output", {"task_id": bobs.id}, token=token).status_code == 404
    direct.claim_next("bob-gpu")
    stolen = fn.post("complete-task", {"task_id": bobs.id, "output_location": "https://evil/x"}, token=token)
    assert stolen.status_code == 404
    assert direct.get(bobs.id).output_location is None

    mine = fn.post(
        "create-task",
        {"task_type": "t2v", "params": {"owner": "alice"}, "project_id": alice.project_id},
        token=token,
    )
    assert mine.status_code == 200, mine.text
    claimed = fn.post("claim-next-task", {"worker_id": "alice-gpu"}, token=token)
    assert claimed.status_code == 200 and claimed.json()["task_id"] == mine.json()["task_id"]
    done = fn.post(
        "complete-task",
        {"task_id": mine.json()["task_id"], "output_location": "https://cdn/a.mp4"},
        token=token,
    )
    assert done.status_code == 200 and done.json()["status"] == "Complete"


def test_a_user_token_needs_a_project_to_create(fn: EdgeFunctions, alice: SupabaseUser):
    answer = fn.post("create-task", {"task_type": "t2v"}, token=alice.access_token)
    assert answer.status_code == 400 and answer.json()["field"] == "project_id"


def test_an_expired_user_jwt_is_refused(fn: EdgeFunctions, alice: SupabaseUser):
    expired = make_jwt({"sub": alice.user_id, "role": "authenticated", "exp": 1_000_000_000}, JWT_SECRET)
    answer = fn.post("claim-next-task", {}, token=expired)
    assert answer.status_code == 403 and "expired" in answer.json()["error"]


def test_http_store_with_a_user_token_sees_only_that_users_tasks(
    fn: EdgeFunctions, direct: TaskStore, alice: SupabaseUser, bob: SupabaseUser
):
    direct.add("t2v", {}, project_id=bob.project_id)
    with open_store(fn.store_url(access_token=alice.access_token)) as store:
        assert isinstance(store.transport, HttpTransport) and alice.access_token not in store.url
        mine = store.add("t2v", {"n": 1}, project_id=alice.project_id)
        assert [t.id for t in store.list()] == [mine.id]
        assert [t.id for t in store.claim_next("alice-gpu", limit=10)] == [mine.id]
        with pytest.raises(TaskForbidden, match="not one of your projects"):
            store.add("t2v", {}, project_id=bob.project_id)
    assert direct.count_by_status()[TaskStatus.QUEUED] == 1  # Bob's, untouched


# --- concurrency ------------------------------------------------------------------------------------------


def test_four_claimers_through_the_functions_claim_each_task_once(fn: EdgeFunctions, direct: TaskStore):
    created = {direct.add("t2v", {"i": i}).id for i in range(500)}
    results: dict[str, list[str]] = {}

    def claimer(worker: str) -> None:
        ids: list[str] = []
        with httpx.Client(headers={"Authorization": f"Bearer {SERVICE_KEY}"}, timeout=60) as client:
            while True:
                answer = client.post(f"{fn.url}/functions/v1/claim-next-task", json={"worker_id": worker})
                if answer.status_code == 204:
                    break
                assert answer.status_code == 200, answer.text
                ids.append(answer.json()["task_id"])
        results[worker] = ids

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [task_id for ids in results.values() for task_id in ids]
    assert len(claimed) == len(set(claimed)) == 500 and set(claimed) == created
    by_worker = {task_id: worker for worker, ids in results.items() for task_id in ids}
    assert all(t.worker_id == by_worker[t.id] for t in direct.list(limit=1000))
    assert all(len(ids) > 0 for ids in results.values())  # the work was actually shared
