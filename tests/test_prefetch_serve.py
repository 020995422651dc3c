"""Prefetch served end to end: a real local Ray cluster (two fake GPUs), the T2V deployment with two replicas
and the tiny models, SQLite. B depends on A and names another T2V model: while A runs on one replica, the
dispatcher has the idle one load B's model, and B then runs there with its model already resident."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.store import open_store
from hwgp_testing import running_app, wait_final

pytestmark = pytest.mark.slow

# A runs long enough (about a second on CPU) for the other replica to load B's model meanwhile (a tiny model
# loads in about 0.1 s).
LONG = {"prompt": "a boat", "resolution": "256x192", "video_length": 17, "num_inference_steps": 30}
SHORT = {"prompt": "a boat", "resolution": "64x48", "video_length": 5, "num_inference_steps": 1}


def test_the_next_tasks_model_loads_on_the_idle_replica_while_its_dependency_runs(tmp_path: Path):
    config = {
        "db": f"sqlite:///{tmp_path / 'tasks.db'}",
        "storage": {"root": str(tmp_path / "files")},
        "models": "tiny",
        "deployments": {
            "T2V": {"num_gpus": 1, "num_cpus": 0.1, "replicas": 2, "attention_backend": "_native_math"}
        },
        "ingress": {"poll_interval_s": 0.1, "progress_interval_s": 0.0, "shutdown_grace_s": 1.0},
    }
    with running_app(config, num_gpus=2) as client:
        response = client.post("/tasks", json={"task_type": "t2v", "params": LONG})
        assert response.status_code == 201, response.text
        first = response.json()["id"]
        response = client.post(
            "/tasks",
            json={"task_type": "t2v", "params": {**SHORT, "model": "tiny-t2v-22"}, "dependant_on": first},
        )
        assert response.status_code == 201, response.text
        second = response.json()["id"]
        tasks = [wait_final(client, task_id, timeout_s=240) for task_id in (first, second)]
        assert [t["status"] for t in tasks] == ["Complete"] * 2, [t["error_message"] for t in tasks]
        replicas = client.get("/replicas").json()["T2V"]["replicas"]

    with open_store(config["db"]) as store:
        a, b = store.get(first).result, store.get(second).result
    assert a["model_load"] == {"model": "tiny-t2v", "reused": False}
    # B's model was resident before B reached its replica: the prefetch paid its load.
    assert b["model_load"] == {"model": "tiny-t2v-22", "reused": True}
    assert b["timings"]["load"] < a["timings"]["load"] / 10, (a["timings"], b["timings"])

    stats = list(replicas.values()) if isinstance(replicas, dict) else replicas
    by_model = {s["loaded_model"]: s for s in stats}
    assert set(by_model) == {"tiny-t2v", "tiny-t2v-22"}, stats
    # One load per replica: A's model on one, B's (prefetched) on the other, which then ran B.
    assert [by_model["tiny-t2v-22"]["prefetches"], by_model["tiny-t2v"]["prefetches"]] == [1, 0]
    assert [s["load_count"] for s in (by_model["tiny-t2v"], by_model["tiny-t2v-22"])] == [1, 1]
    assert [e["task_id"] for e in by_model["tiny-t2v-22"]["recent"]] == [second]
    assert [e["task_id"] for e in by_model["tiny-t2v"]["recent"]] == [first]
    # B's model loaded while A was still on its replica: the load overlapped A's run.
    a_busy, prefetch = by_model["tiny-t2v"]["recent"][0], by_model["tiny-t2v-22"]["last_prefetch"]
    assert prefetch["model"] == "tiny-t2v-22"
    assert prefetch["finished"] < a_busy["finished"], (a_busy, prefetch)
