"""Issue 21.5 served end to end: a real local Ray cluster (a fake GPU), the T2V deployment with the tiny
models, SQLite. The replica hands back frames and takes its next task; the encode runs in a CPU Ray task.
Several tasks queued at once all complete, in queue order, each with its own output, and the replica's busy
time ends before its task's encode begins."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from db.store import open_store
from hwgp_testing import running_app, wait_final
from Wan2GP.acceleration import AccelerationConfig
from Wan2GP.catalog import Catalog
from Wan2GP.engine import Engine

pytestmark = pytest.mark.slow

SMALL = {"prompt": "a boat", "resolution": "64x48", "video_length": 9, "num_inference_steps": 2}
TASKS = 5


def test_queued_tasks_all_complete_in_order_with_the_encode_off_the_replica(tmp_path: Path):
    config = {
        "db": f"sqlite:///{tmp_path / 'tasks.db'}",
        "storage": {"root": str(tmp_path / "files")},
        "models": "tiny",
        "deployments": {"T2V": {"num_gpus": 1, "num_cpus": 0.1, "attention_backend": "_native_math"}},
        "ingress": {"poll_interval_s": 0.1, "progress_interval_s": 0.0, "shutdown_grace_s": 1.0},
    }
    with running_app(config, num_gpus=1) as client:
        ids = []
        for seed in range(TASKS):
            response = client.post("/tasks", json={"task_type": "t2v", "params": {**SMALL, "seed": seed}})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        tasks = [wait_final(client, task_id, timeout_s=240) for task_id in ids]
        assert [t["status"] for t in tasks] == ["Complete"] * TASKS, [t["error_message"] for t in tasks]
        outputs = [client.get(f"/tasks/{task_id}/output").content for task_id in ids]
        replica = client.get("/replicas").json()["T2V"]

    # Nothing lost, nothing swapped: each output is the one its own seed gives, byte for byte (the same
    # engine and encoder in this process, on the same tiny weights).
    acceleration = AccelerationConfig(attention_backend="_native_math")
    engine = Engine(device="cpu", catalog=Catalog.load(), lora_dirs=[], acceleration=acceleration)
    for seed, data in enumerate(outputs):
        assert engine.generate("t2v", {**SMALL, "model": "tiny-t2v", "seed": seed}).data == data
    assert len(set(outputs)) == TASKS

    with open_store(config["db"]) as store:
        rows = [store.get(task_id) for task_id in ids]
    results = [row.result for row in rows]
    assert [r["seed"] for r in results] == list(range(TASKS))
    # The deployment's config reached the engine, and each result records what ran (compile off by default).
    assert {r["acceleration"]["attention_backend"] for r in results} == {"_native_math"}
    assert {tuple(r["acceleration"]["compiled"]) for r in results} == {()}
    # Each result says where the time went (issue 21.6): every stage, none negative, and the stages the
    # task went through in turn fit in its time between claim and completion.
    stages = ("queue_wait", "input_fetch", "load", "text_encode", "denoise", "decode", "encode", "save")
    for row, result in zip(rows, results, strict=True):
        timings = result["timings"]
        assert set(stages) <= set(timings), timings
        assert all(seconds >= 0 for seconds in timings.values()), timings
        claimed_to_complete = (row.generation_processed_at - row.generation_started_at).total_seconds()
        assert sum(timings[s] for s in stages if s != "queue_wait") <= claimed_to_complete + 0.05, timings
        assert timings["queue_wait"] <= (row.generation_started_at - row.created_at).total_seconds() + 0.01
    # The second task of the same prompt skipped the text encoder.
    assert [r["acceleration"]["text_encode_cache"]["hits"] for r in results] == [0] + [1] * (TASKS - 1)

    # Queue order kept: the replica generated them in the order they were queued.
    busy = {entry["task_id"]: entry for entry in replica["recent"]}
    assert [busy[task_id]["started"] for task_id in ids] == sorted(
        busy[task_id]["started"] for task_id in ids
    )
    overlapped = 0
    for task_id, result in zip(ids, results, strict=True):
        # The replica was done with the task before its encode started: the encode was not its time.
        assert busy[task_id]["finished"] <= result["encode_started_at"] + 0.01
        assert result["timings"]["encode"] >= 0
        later = [busy[other]["started"] for other in ids if busy[other]["started"] > busy[task_id]["started"]]
        encode_end = result["encode_started_at"] + result["timings"]["encode"]
        overlapped += bool(later) and min(later) < encode_end
    print(f"next generation started before the previous encode ended: {overlapped} of {TASKS - 1}")
    # The replica's generations never overlap (max_ongoing_requests 1).
    spans = sorted((entry["started"], entry["finished"]) for entry in busy.values())
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))
