"""Issue 16 items 7 and 8: the travel splice attack, and no internals in what users are told.

The real api, dispatcher, routing, SQLite and the real orchestration runner (its `prepare` step, which
needs no Ray cluster); Ray's own error class for the failure messages."""

from __future__ import annotations

import logging
import sqlite3
import uuid
from pathlib import Path

import pytest
from api_fixtures import api
from ray.exceptions import RayTaskError

from dag.steps import StepFailed
from dag.travel import mirror_id
from db.models import TaskStatus
from deployments.dispatcher import Job, RunResult
from deployments.runners import OrchestrationRunner, user_message
from deployments.task_types import GENERATION, ORCHESTRATION, TRAVEL_SEGMENT

ATTACKER = "attacker-key-0123456789abcdef"
VICTIM = "victim-key-0123456789abcdef"
KEYS = [
    {"name": "attacker", "key": ATTACKER, "projects": ["evil"]},
    {"name": "victim", "key": VICTIM, "projects": ["good"]},
]
TRAVEL = {"images": ["a.png", "b.png", "c.png"], "prompt": "a walk", "frames": 17, "overlap": 4,
          "resolution": "64x48"}  # fmt: skip


def wait_final(store, task_id: str, timeout_s: float = 10):
    import time

    deadline = time.monotonic() + timeout_s
    while (task := store.get(task_id)).status in (TaskStatus.QUEUED, TaskStatus.IN_PROGRESS):
        assert time.monotonic() < deadline, task
        time.sleep(0.02)
    return task


def orchestration_runner(store, storage, fetcher, routing):
    return {ORCHESTRATION: OrchestrationRunner(store, storage, fetcher, routing, {}, "ingress-test")}


def test_a_row_planted_under_a_future_segment_id_is_never_spliced_in(tmp_path: Path):
    with api(tmp_path, keys=KEYS, runners=orchestration_runner) as (client, store, _):
        (tmp_path / "inputs").mkdir(exist_ok=True)
        for name in ("a.png", "b.png", "c.png"):
            (tmp_path / "inputs" / name).write_bytes(b"png")
        victim_id = str(uuid.uuid4())
        planted_id = mirror_id(victim_id, f"{TRAVEL_SEGMENT}:0")  # predictable from the victim's id
        planted = client.post(
            "/tasks",
            json={"task_type": "t2v", "params": {"prompt": "spliced"}, "task_id": planted_id},
            headers={"Authorization": f"Bearer {ATTACKER}"},
        )
        assert planted.status_code == 201, planted.text
        assert wait_final(store, planted_id).status == TaskStatus.COMPLETE  # its output exists

        travel = client.post(
            "/tasks",
            json={"task_type": "travel_orchestrator", "params": TRAVEL, "task_id": victim_id},
            headers={"Authorization": f"Bearer {VICTIM}"},
        )
        assert travel.status_code == 201, travel.text
        failed = wait_final(store, victim_id)
        assert failed.status == TaskStatus.FAILED
        assert failed.error_message == (
            f"task id {planted_id} (this run's travel_segment row) is already taken by another task; "
            "resubmit under a new task id"
        )
        assert store.get(planted_id).task_type == "t2v"  # the planted row is left as it was
        assert store.get(planted_id).project_id == "evil"


class Exploding:
    """A runner whose replica dies with a message full of internals."""

    async def run(self, job: Job) -> RunResult:
        raise RuntimeError("ActorDiedError: node 10.1.2.3 pid=4242 /srv/hwgp/.venv/lib/ray/_raylet.so")


def test_failures_tell_users_what_went_wrong_not_where_it_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    def runners(*_):
        return {GENERATION: Exploding()}

    with api(tmp_path, runners=runners) as (client, store, _):
        task_id = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "x"}}).json()["id"]
        task = wait_final(store, task_id)
        assert task.status == TaskStatus.FAILED and task.error_message == "replica error: RuntimeError"
        assert "10.1.2.3" in caplog.text  # the details are in the log

    # Failures inside Ray tasks: a user's error keeps its message without Ray's wrapper; anything else
    # becomes a sentence with an incident id, and the traceback goes to the log.
    traceback = 'Traceback (most recent call last):\n  File "/srv/hwgp/dag/utility_tasks.py", line 9'

    def ray_error(cause: BaseException) -> RayTaskError:
        return RayTaskError(
            "utility_node", traceback, cause, proctitle="ray::utility_node", pid=4242, ip="10.1.2.3"
        )

    assert user_message(ray_error(ValueError("frame_index 99 is out of range")), "extract_frame") == (
        "frame_index 99 is out of range"
    )
    assert user_message(ray_error(StepFailed("segment 1: CUDA out of memory")), "travel") == (
        "segment 1: CUDA out of memory"
    )
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        message = user_message(ray_error(OSError("/srv/hwgp/secret: disk full")), "join_clips")
    assert message.startswith("join_clips failed unexpectedly (OSError); incident ")
    for internal in ("4242", "10.1.2.3", "/srv/hwgp", "Traceback"):
        assert internal not in message
    incident = message.rsplit("incident ", 1)[1].split()[0]
    assert incident in caplog.text and "10.1.2.3" in caplog.text


def test_a_locked_database_is_503_without_details(tmp_path: Path):
    with api(tmp_path, db_query="?busy_timeout_s=0.2") as (client, store, _):
        locker = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            response = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "x"}})
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json() == {
            "detail": "the task database is unavailable (it did not answer in time); retry later"
        }
        assert client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "x"}}).status_code == 201
