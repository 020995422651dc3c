"""The TaskStore behaviour suite: every test runs against SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest
from conftest import raw_execute

from db.models import TaskStatus
from db.store import InvalidTask, TaskConflict, TaskNotFound, TaskStore, open_store


def snapshot(store: TaskStore) -> list[tuple]:
    return [(t.id, t.status, t.params, t.output_location) for t in store.list(limit=10_000)]


# --- create / read -----------------------------------------------------------------------------


def test_create_and_get_round_trip(store: TaskStore):
    task = store.add("t2v", {"prompt": "a cat", "nested": {"n": [1, 2.5, None]}}, project_id="p1", priority=3)
    got = store.get(task.id)
    assert got == task
    assert got.status == TaskStatus.QUEUED
    assert got.params == {"prompt": "a cat", "nested": {"n": [1, 2.5, None]}}
    assert got.project_id == "p1" and got.priority == 3 and got.attempts == 0
    assert str(uuid.UUID(got.id)) == got.id


def test_list_filters_and_paging(store: TaskStore):
    ids = [store.add("t2v" if i % 2 else "flux", {"i": i}, project_id=f"p{i % 3}").id for i in range(9)]
    assert [t.id for t in store.list()] == list(reversed(ids))  # newest first
    assert {t.task_type for t in store.list(task_type="flux")} == {"flux"}
    assert len(store.list(task_type="flux")) == 5
    assert len(store.list(project_id="p0")) == 3
    page1, page2 = store.list(limit=4), store.list(limit=4, offset=4)
    assert [t.id for t in page1 + page2] == list(reversed(ids))[:8]
    store.cancel(ids[0])
    assert [t.id for t in store.list(status=TaskStatus.CANCELLED)] == [ids[0]]
    counts = store.count_by_status()
    assert counts[TaskStatus.QUEUED] == 8 and counts[TaskStatus.CANCELLED] == 1
    assert store.count_by_status(["flux"])[TaskStatus.QUEUED] == 4


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"task_type": "t2v", "params": '{"prompt": '}, "params"),
        ({"task_type": "t2v", "params": "[1, 2]"}, "params"),
        ({"task_type": "", "params": {}}, "task_type"),
        ({"task_type": "bad type!", "params": {}}, "task_type"),
        ({"task_type": "t2v", "params": {}, "dependant_on": "not-a-uuid"}, "dependant_on"),
        ({"task_type": "t2v", "params": {}, "dependant_on": str(uuid.uuid4())}, "dependant_on"),
        ({"task_type": "t2v", "params": {}, "id": "123"}, "id"),
        ({"task_type": "t2v", "params": {}, "priority": 10**9}, "priority"),
        ({"task_type": "t2v", "params": {"big": "x" * 1_100_000}}, "params"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(store: TaskStore, fields: dict, field: str):
    store.add("t2v", {"keep": True})
    before = snapshot(store)
    fields = dict(fields)  # parametrize shares the dict between backends
    task_type = fields.pop("task_type")
    params = fields.pop("params")
    with pytest.raises(InvalidTask) as info:
        store.add(task_type, params, **fields)
    assert info.value.field == field
    assert field in str(info.value)
    assert snapshot(store) == before


def test_duplicate_id_is_rejected(store: TaskStore):
    task = store.add("t2v", {"a": 1})
    with pytest.raises(InvalidTask, match="already exists") as info:
        store.add("flux", {"b": 2}, id=task.id)
    assert info.value.field == "id"
    assert store.get(task.id).params == {"a": 1}


def test_unknown_task_id(store: TaskStore):
    missing = str(uuid.uuid4())
    before = snapshot(store)
    for call in (store.get, store.cancel, lambda i: store.complete(i, "x"), lambda i: store.fail(i, "x")):
        with pytest.raises(TaskNotFound, match=missing):
            call(missing)
    assert snapshot(store) == before


# --- claiming ----------------------------------------------------------------------------------


def test_claim_order_is_priority_then_age(store: TaskStore):
    old = store.add("t2v", {"n": "old"})
    new = store.add("t2v", {"n": "new"})
    urgent = store.add("t2v", {"n": "urgent"}, priority=5)
    claimed = [store.claim_next("w")[0].id for _ in range(3)]
    assert claimed == [urgent.id, old.id, new.id]
    assert store.claim_next("w") == []


def test_claim_sets_worker_fields_and_filters_types(store: TaskStore):
    flux = store.add("flux", {})
    t2v = store.add("t2v", {})
    assert store.claim_next("w1", task_types=[]) == []
    [task] = store.claim_next("w1", task_types=["t2v", "vace"])
    assert task.id == t2v.id
    assert task.status == TaskStatus.IN_PROGRESS and task.worker_id == "w1" and task.attempts == 1
    assert task.heartbeat_at is not None and task.generation_started_at is not None
    batch = store.claim_next("w2", limit=10)
    assert [t.id for t in batch] == [flux.id]


def test_tasks_inserted_directly_are_claimable(store: TaskStore, store_url: str):
    task_id = str(uuid.uuid4())
    raw_execute(
        store_url,
        "INSERT INTO tasks (id, task_type, params, status) VALUES (%s, %s, %s, %s)",
        (task_id, "t2v", '{"prompt": "from another system"}', "Queued"),
    )
    [task] = store.claim_next("w")
    assert task.id == task_id and task.params == {"prompt": "from another system"}


# --- dependencies --------------------------------------------------------------------------------


def test_chain_runs_in_order(store: TaskStore):
    a = store.add("t2v", {"step": "a"})
    b = store.add("t2v", {"step": "b"}, dependant_on=a.id)
    c = store.add("t2v", {"step": "c"}, dependant_on=b.id)

    [first] = store.claim_next("w", limit=10)
    assert first.id == a.id  # b and c wait for their dependencies
    store.complete(a.id, "files/a.mp4", worker_id="w")
    [second] = store.claim_next("w", limit=10)
    assert second.id == b.id
    assert store.claim_next("w") == []  # c waits while b is In Progress
    store.complete(b.id, "files/b.mp4", worker_id="w")
    [third] = store.claim_next("w", limit=10)
    assert third.id == c.id


def test_failed_dependency_fails_the_chain_naming_it(store: TaskStore):
    a = store.add("t2v", {})
    b = store.add("vace", {}, dependant_on=a.id)
    c = store.add("flux", {}, dependant_on=b.id)
    store.claim_next("w")
    store.complete(a.id, "files/a.mp4", worker_id="w")
    store.claim_next("w")
    store.fail(b.id, "CUDA out of memory", worker_id="w")

    c_now = store.get(c.id)
    assert c_now.status == TaskStatus.FAILED
    assert b.id in c_now.error_message and "CUDA out of memory" in c_now.error_message
    assert c_now.output_location == c_now.error_message  # the original did (docs/compatibility.md)
    assert store.claim_next("w") == []


def test_cancelled_dependency_fails_dependants(store: TaskStore):
    a = store.add("t2v", {})
    b = store.add("t2v", {}, dependant_on=a.id)
    store.cancel(a.id)
    assert store.get(b.id).status == TaskStatus.FAILED
    assert f"dependency {a.id} (t2v) was cancelled" in store.get(b.id).error_message


def test_new_task_on_a_failed_dependency_fails_at_once(store: TaskStore):
    a = store.add("t2v", {})
    store.fail(a.id, "bad prompt")
    b = store.add("t2v", {}, dependant_on=a.id)
    assert b.status == TaskStatus.FAILED and a.id in b.error_message


def test_propagation_catches_rows_written_directly(store: TaskStore, store_url: str):
    failed = store.add("t2v", {})
    store.fail(failed.id, "boom")
    orphan, on_failed = str(uuid.uuid4()), str(uuid.uuid4())
    missing = str(uuid.uuid4())
    for task_id, dep in ((orphan, missing), (on_failed, failed.id)):
        raw_execute(
            store_url,
            "INSERT INTO tasks (id, task_type, params, status, dependant_on) VALUES (%s, 't2v', '{}', 'Queued', %s)",
            (task_id, dep),
        )
    changed = {t.id for t in store.propagate_failures()}
    assert changed == {orphan, on_failed}
    assert store.get(orphan).error_message == f"dependency {missing} does not exist"
    assert "boom" in store.get(on_failed).error_message


# --- completing, failing, cancelling ----------------------------------------------------------------


def test_complete_records_output_once(store: TaskStore):
    task = store.add("t2v", {})
    with pytest.raises(TaskConflict, match="Queued"):
        store.complete(task.id, "files/x.mp4")  # not claimed yet
    store.claim_next("w1")
    with pytest.raises(TaskConflict, match="w1"):
        store.complete(task.id, "files/x.mp4", worker_id="w2")
    done = store.complete(task.id, "files/x.mp4", worker_id="w1")
    assert done.status == TaskStatus.COMPLETE and done.output_location == "files/x.mp4"
    assert done.progress == 1.0 and done.generation_processed_at is not None
    with pytest.raises(TaskConflict, match="Complete"):
        store.complete(task.id, "files/other.mp4", worker_id="w1")
    assert store.get(task.id).output_location == "files/x.mp4"


def test_complete_stores_the_result_with_the_row(store: TaskStore):
    task = store.add("t2v", {})
    assert task.result is None
    store.claim_next("w1")
    result = {
        "model": "tiny-t2v",
        "seed": 7,
        "loras": [{"name": "a", "multiplier": 0.5}],
        "timings": {"denoise": 1.5},
    }
    with pytest.raises(InvalidTask) as bad:
        store.complete(task.id, "files/x.mp4", worker_id="w1", result=["not", "an", "object"])  # type: ignore[arg-type]
    assert bad.value.field == "result"
    assert store.get(task.id).status == TaskStatus.IN_PROGRESS  # nothing written
    done = store.complete(task.id, "files/x.mp4", worker_id="w1", result=result)
    assert done.result == result and store.get(task.id).result == result
    assert store.list(status=TaskStatus.COMPLETE)[0].result == result
    # A retry after a lost reply returns the stored row, result included.
    again = store.complete_idempotent(task.id, "files/x.mp4", worker_id="w1", result=result)
    assert again.result == result


def test_retryable_failure_requeues_until_attempts_run_out(store: TaskStore):
    task = store.add("t2v", {})
    store.claim_next("w")
    again = store.fail(task.id, "replica died", worker_id="w", retryable=True, max_attempts=2)
    assert again.status == TaskStatus.QUEUED and again.worker_id is None and again.output_location is None
    store.claim_next("w")
    final = store.fail(task.id, "replica died again", worker_id="w", retryable=True, max_attempts=2)
    assert final.status == TaskStatus.FAILED and final.attempts == 2
    assert final.error_message == final.output_location == "replica died again"


def test_cancel_queued_running_and_finished(store: TaskStore):
    queued, running, done = store.add("t2v", {}), store.add("t2v", {}), store.add("t2v", {})
    assert store.cancel(queued.id).status == TaskStatus.CANCELLED
    [r] = store.claim_next("w")
    assert r.id == running.id
    assert store.heartbeat(running.id, "w")
    store.cancel(running.id)
    # The worker learns at its next heartbeat / progress write, and cannot record an output.
    assert not store.heartbeat(running.id, "w")
    assert not store.set_progress(running.id, "w", 0.5, "step 5/10")
    with pytest.raises(TaskConflict, match="Cancelled"):
        store.complete(running.id, "files/late.mp4", worker_id="w")
    store.claim_next("w")
    store.complete(done.id, "files/done.mp4", worker_id="w")
    with pytest.raises(TaskConflict, match="Complete"):
        store.cancel(done.id)
    assert store.get(done.id).status == TaskStatus.COMPLETE


def test_release_gives_the_claim_back_without_spending_an_attempt(store: TaskStore):
    task = store.add("t2v", {})
    store.claim_next("w")
    assert not store.release(task.id, "other-worker", "shutting down")
    assert store.release(task.id, "w", "requeued: worker w shutting down")
    released = store.get(task.id)
    assert released.status == TaskStatus.QUEUED and released.attempts == 0 and released.worker_id is None
    assert released.progress_message == "requeued: worker w shutting down"
    assert not store.release(task.id, "w", "again")  # no longer in progress
    [again] = store.claim_next("w2")
    assert again.id == task.id and again.attempts == 1


def test_start_takes_over_an_unfinished_task(store: TaskStore):
    queued, failed, done = (
        store.add("travel_segment", {}),
        store.add("travel_segment", {}),
        store.add("t2v", {}),
    )
    started = store.start(queued.id, "orchestrator")
    assert (
        started.status == TaskStatus.IN_PROGRESS
        and started.worker_id == "orchestrator"
        and started.attempts == 1
    )
    store.fail(failed.id, "earlier run died")
    restarted = store.start(failed.id, "orchestrator-2")
    assert restarted.status == TaskStatus.IN_PROGRESS and restarted.error_message is None
    assert restarted.output_location is None
    taken_over = store.start(queued.id, "orchestrator-2")  # left In Progress by a dead worker
    assert taken_over.worker_id == "orchestrator-2" and taken_over.attempts == 2
    store.claim_next("w", task_types=["t2v"])
    store.complete(done.id, "files/x.mp4")
    with pytest.raises(TaskConflict, match="Complete"):
        store.start(done.id, "orchestrator")
    with pytest.raises(TaskNotFound):
        store.start(str(uuid.uuid4()), "orchestrator")


def test_progress_is_stored_and_validated(store: TaskStore):
    task = store.add("t2v", {})
    store.claim_next("w")
    assert store.set_progress(task.id, "w", 0.25, "step 5/20, ETA 12 s")
    got = store.get(task.id)
    assert got.progress == 0.25 and got.progress_message == "step 5/20, ETA 12 s"
    with pytest.raises(InvalidTask, match="progress"):
        store.set_progress(task.id, "w", 1.5)
    assert not store.set_progress(task.id, "someone-else", 0.5)
    assert store.get(task.id).progress == 0.25


# --- stale recovery ---------------------------------------------------------------------------------


def test_stale_task_is_requeued_then_failed_after_the_attempt_limit(store: TaskStore):
    task = store.add("t2v", {})
    fresh = store.add("t2v", {})
    store.claim_next("dead-worker")
    time.sleep(0.3)
    store.claim_next("live-worker")  # fresh heartbeat: must not be touched

    changed = store.requeue_stale(older_than_s=0.2, max_attempts=2)
    assert [t.id for t in changed] == [task.id]
    requeued = store.get(task.id)
    assert requeued.status == TaskStatus.QUEUED and requeued.attempts == 1 and requeued.worker_id is None
    assert "dead-worker" in requeued.progress_message
    assert store.get(fresh.id).status == TaskStatus.IN_PROGRESS

    [again] = store.claim_next("dead-worker-2")
    assert again.id == task.id and again.attempts == 2
    time.sleep(0.3)
    store.heartbeat(fresh.id, "live-worker")
    changed = store.requeue_stale(older_than_s=0.2, max_attempts=2)
    assert [t.id for t in changed] == [task.id]
    gave_up = store.get(task.id)
    assert gave_up.status == TaskStatus.FAILED
    assert (
        "dead-worker-2 stopped heartbeating" in gave_up.error_message
        and "2 attempts" in gave_up.error_message
    )
    assert store.get(fresh.id).status == TaskStatus.IN_PROGRESS


def test_heartbeat_keeps_a_task_alive(store: TaskStore):
    task = store.add("t2v", {})
    store.claim_next("w")
    time.sleep(0.3)
    assert store.heartbeat(task.id, "w")
    assert store.requeue_stale(older_than_s=0.2) == []
    assert store.get(task.id).status == TaskStatus.IN_PROGRESS


# --- schema, waking, concurrency ----------------------------------------------------------------------


def test_migrations_reapply_cleanly(store: TaskStore, store_url: str):
    task = store.add("t2v", {"x": 1})
    assert store.migrate() == []
    with open_store(store_url) as second:
        assert second.migrate() == []
        assert second.get(task.id).params == {"x": 1}


def test_wait_for_work_wakes_on_insert(store: TaskStore, store_url: str):
    assert store.wait_for_work(0.2) is False or store.claim_next("w") == []

    def insert_later() -> None:
        time.sleep(0.3)
        with open_store(store_url, migrate=False) as other:
            other.add("t2v", {})

    thread = threading.Thread(target=insert_later)
    started = time.monotonic()
    thread.start()
    woke = store.wait_for_work(10.0)
    elapsed = time.monotonic() - started
    thread.join()
    assert woke and elapsed < 5.0
    assert len(store.claim_next("w")) == 1


def _claim_until_empty(url: str, worker: str) -> list[str]:
    ids: list[str] = []
    with open_store(url, migrate=False) as store:
        while True:
            tasks = store.claim_next(worker, limit=1)
            if not tasks:
                return ids
            ids.extend(t.id for t in tasks)


def test_eight_processes_claim_each_task_exactly_once(store: TaskStore, store_url: str):
    created = {store.add("t2v", {"i": i}).id for i in range(2000)}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(8, mp_context=ctx) as pool:
        results = list(pool.map(_claim_until_empty, [store_url] * 8, [f"w{i}" for i in range(8)]))
    claimed = [task_id for ids in results for task_id in ids]
    assert len(claimed) == len(set(claimed)) == 2000  # nobody claimed a task twice
    assert set(claimed) == created  # none lost
    assert store.count_by_status()[TaskStatus.IN_PROGRESS] == 2000
    # Each task's worker_id is the process that got it.
    by_worker = {task_id: f"w{i}" for i, ids in enumerate(results) for task_id in ids}
    assert all(t.worker_id == by_worker[t.id] for t in store.list(limit=10_000))
