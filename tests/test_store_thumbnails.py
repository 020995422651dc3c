"""`thumbnail_url` written into a task's params by `complete`, where the original's complete-task puts it,
on every store (SQLite, PostgreSQL, Supabase direct and over its edge functions)."""

from __future__ import annotations

import pytest

from db.models import TaskStatus
from db.store import InvalidTask, TaskConflict, TaskStore
from db.thumbnails import params_with_thumbnail_url

URL = "https://x.supabase.co/storage/v1/object/public/image_uploads/t/thumbnails/thumb_0c4f7b6e.jpg"
PARAMS = {
    "prompt": "un chat – ünïcode",
    "seed": 7,
    "ratio": 0.5,
    "flag": True,
    "nothing": None,
    "list": [1, {"a": [2, 3]}],
    "full_orchestrator_payload": {"run_id": "r1", "shot_id": "s", "accelerated": True},
    "orchestrator_details": {"run_id": "r2", "nested": {"deep": [None, "x"]}},
}
# The original's three rules, spelled out (db.thumbnails and the SQL function must both give these).
EXPECTED = {
    "travel_stitch": {
        **PARAMS,
        "full_orchestrator_payload": {
            "run_id": "r1",
            "shot_id": "s",
            "accelerated": False,
            "thumbnail_url": URL,
        },
    },
    "wan_2_2_i2v": {
        **PARAMS,
        "orchestrator_details": {"run_id": "r2", "nested": {"deep": [None, "x"]}, "thumbnail_url": URL},
    },
    "t2v": {**PARAMS, "thumbnail_url": URL},
}


@pytest.mark.parametrize("task_type", sorted(EXPECTED))
def test_complete_writes_thumbnail_url_where_the_original_does(store: TaskStore, task_type: str):
    assert params_with_thumbnail_url(task_type, PARAMS, URL) == EXPECTED[task_type]
    task = store.add(task_type, PARAMS)
    store.claim_next("w")
    done = store.complete(task.id, "files/out.mp4", worker_id="w", result={"seed": 7}, thumbnail_url=URL)
    assert done.params == EXPECTED[task_type]
    stored = store.get(task.id)
    assert stored.params == EXPECTED[task_type]
    assert stored.status == TaskStatus.COMPLETE and stored.output_location == "files/out.mp4"
    assert stored.result == {"seed": 7}


def test_holders_that_are_not_objects_and_an_old_url_are_replaced(store: TaskStore):
    odd = store.add("travel_stitch", {"full_orchestrator_payload": "not an object", "k": 1})
    top = store.add("vace", {"thumbnail_url": "sent by a client", "k": 2})
    store.claim_next("w", limit=2)
    assert store.complete(odd.id, "o.mp4", thumbnail_url=URL).params == {
        "full_orchestrator_payload": {"thumbnail_url": URL, "accelerated": False},
        "k": 1,
    }
    assert store.complete(top.id, "o.mp4", thumbnail_url=URL).params == {"thumbnail_url": URL, "k": 2}


def test_without_a_thumbnail_the_params_stay_as_they_were(store: TaskStore):
    task = store.add("travel_stitch", PARAMS)
    store.claim_next("w")
    assert store.complete(task.id, "o.mp4").params == PARAMS
    assert store.get(task.id).params == PARAMS


def test_a_refused_completion_writes_no_thumbnail(store: TaskStore):
    queued = store.add("t2v", PARAMS)
    with pytest.raises(TaskConflict):
        store.complete(queued.id, "o.mp4", thumbnail_url=URL)
    mine = store.add("t2v", PARAMS, priority=5)
    assert [t.id for t in store.claim_next("w")] == [mine.id]
    for bad in ("", "x" * 5000):
        with pytest.raises(InvalidTask) as info:
            store.complete(mine.id, "o.mp4", thumbnail_url=bad)
        assert info.value.field == "thumbnail_url"
    with pytest.raises(TaskConflict):  # someone else's claim
        store.complete(mine.id, "o.mp4", worker_id="other", thumbnail_url=URL)
    assert store.get(queued.id).params == PARAMS
    assert store.get(mine.id).params == PARAMS and store.get(mine.id).status == TaskStatus.IN_PROGRESS


def test_a_retried_complete_with_a_thumbnail_returns_the_task(store: TaskStore):
    task = store.add("wan_2_2_i2v", PARAMS)
    store.claim_next("w")
    done = store.complete_idempotent(task.id, "o.mp4", worker_id="w", thumbnail_url=URL)
    again = store.complete_idempotent(task.id, "o.mp4", worker_id="w", thumbnail_url=URL)
    assert again == done and again.params == EXPECTED["wan_2_2_i2v"]
