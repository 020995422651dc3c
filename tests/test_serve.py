"""The Ray Serve application end to end: a real local Ray cluster (fake GPUs), tiny models, SQLite.

One application serves the whole module (starting Ray and loading models is the slow part).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from conftest import raw_execute
from ray import serve

from db.store import open_store
from deployments.dispatcher import CPU_STAGE_LIMIT
from hwgp_testing import FINAL, running_app, wait_final
from Wan2GP.video import encode_mp4, encode_png, probe_video

pytestmark = pytest.mark.slow

SMALL = {"resolution": "64x48", "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("serve")
    inputs = root / "inputs"
    inputs.mkdir()
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    (inputs / "start.png").write_bytes(encode_png(gradient))
    (inputs / "end.png").write_bytes(encode_png(255 - gradient))
    (inputs / "guide.mp4").write_bytes(encode_mp4(np.stack([gradient] * 9), fps=16))

    db = f"sqlite:///{root / 'tasks.db'}"
    family = {"num_gpus": 0.5, "num_cpus": 0.1}
    config = {
        "db": db,
        "storage": {"root": str(root / "public" / "files")},
        "input_dirs": [str(inputs)],
        "models": "tiny",
        "deployments": {"T2V": family, "VACE": family, "Flux": family, "Image": family},
        "ingress": {
            "heartbeat_interval_s": 0.5,
            "poll_interval_s": 0.2,
            "progress_interval_s": 0.0,
            "shutdown_grace_s": 1.0,
        },
    }
    with running_app(config) as client:
        yield {"client": client, "db": db, "inputs": inputs, "files": root / "public" / "files"}


def submit(client: httpx.Client, task_type: str, params: dict) -> str:
    response = client.post("/tasks", json={"task_type": task_type, "params": params})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("task_type", "params", "frames", "size"),
    [
        ("t2v", {"prompt": "a cat", "video_length": 9}, 9, (64, 48)),
        ("i2v", {"prompt": "a cat", "video_length": 5, "image_start": "start.png"}, 5, (64, 48)),
        (
            "i2v",
            {"prompt": "fade", "video_length": 5, "image_start": "start.png", "image_end": "end.png"},
            5,
            (64, 48),
        ),
        ("vace", {"prompt": "guided", "video_guide": "guide.mp4", "video_length": 9}, 9, (64, 48)),
        ("flux", {"prompt": "a red square"}, 1, (64, 48)),
        ("single_image", {"prompt": "one frame"}, 1, (64, 48)),
        ("magic_edit", {"prompt": "make it blue", "image_url": "start.png"}, 1, (64, 48)),
        ("qwen_image", {"prompt": "a cat with a hat", "resolution": "48x32"}, 1, (48, 32)),
        ("z_image_turbo", {"prompt": "a dog", "resolution": "64x32"}, 1, (64, 32)),
        ("qwen_image_edit", {"prompt": "make it red", "image": "start.png", "resolution": "64x48"}, 1, None),
    ],
)
def test_each_family_over_http(service: dict, task_type: str, params: dict, frames: int, size: tuple):
    client = service["client"]
    params = {**SMALL, **params}
    for key in ("image_start", "image_end", "video_guide", "image_url", "image"):
        if key in params:
            params[key] = str(service["inputs"] / params[key])
    task_id = submit(client, task_type, params)
    task = wait_final(client, task_id)
    assert task["status"] == "Complete", task["error_message"]
    assert task["output_location"].startswith(f"files/{task_id}/")
    output = client.get(f"/tasks/{task_id}/output")
    assert output.status_code == 200
    if frames == 1:
        assert output.content[:8] == b"\x89PNG\r\n\x1a\n"
        from Wan2GP.video import load_image

        shape = load_image(output.content).shape
        assert shape == (size[1], size[0], 3) if size else shape[2] == 3
    else:
        info = probe_video(output.content)
        assert (info["frames"], info["width"], info["height"]) == (frames, *size)


def test_a_completed_t2v_row_records_its_thumbnail_in_its_params(service: dict):
    params = {**SMALL, "prompt": "thumbs", "video_length": 5, "shot_id": "s1", "thumbnail_url": "sent"}
    task_id = submit(service["client"], "t2v", params)
    task = wait_final(service["client"], task_id)
    assert task["status"] == "Complete", task["error_message"]
    with open_store(service["db"], migrate=False) as store:
        row = store.get(task_id)
    url = f"files/{task_id}/thumb_{task_id[:8]}.jpg"
    assert row.params == {**params, "thumbnail_url": url}  # keys kept; a sent URL replaced (t2v: top level)
    assert row.result["thumbnail_url"] == url
    assert (service["files"] / task_id / f"thumb_{task_id[:8]}.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_tasks_written_straight_into_sqlite_run(service: dict):
    task_id = str(uuid.uuid4())
    raw_execute(
        service["db"],
        "INSERT INTO tasks (id, task_type, params, status) VALUES (%s, 't2v', %s, 'Queued')",
        (
            task_id,
            '{"prompt": "from the table", "video_length": 5, "resolution": "64x48", "num_inference_steps": 2}',
        ),
    )
    task = wait_final(service["client"], task_id)
    assert task["status"] == "Complete", task["error_message"]
    assert probe_video(service["client"].get(f"/tasks/{task_id}/output").content)["frames"] == 5


def test_model_stays_loaded_between_tasks(service: dict):
    client = service["client"]
    before = client.get("/replicas").json()["T2V"]
    for seed in (1, 2):
        task = wait_final(
            client, submit(client, "t2v", {**SMALL, "prompt": "again", "video_length": 5, "seed": seed})
        )
        assert task["status"] == "Complete"
    after = client.get("/replicas").json()["T2V"]
    assert after["loaded_model"] == "tiny-t2v"
    # Earlier tests may have switched models; these two tasks on one model load it at most once.
    assert after["load_count"] - before["load_count"] <= (0 if before["loaded_model"] == "tiny-t2v" else 1)
    assert after["generations"] == before["generations"] + 2


def test_in_progress_never_exceeds_capacity(service: dict):
    client = service["client"]
    ids = [
        submit(client, "flux", {**SMALL, "prompt": f"image {i}", "resolution": "32x32"}) for i in range(10)
    ]
    peak = 0
    with open_store(service["db"]) as store:
        while True:
            tasks = [store.get(i) for i in ids]
            peak = max(peak, sum(t.status.value == "In Progress" for t in tasks))
            if all(t.status.value in FINAL for t in tasks):
                break
            time.sleep(0.05)
    assert all(store_task.status.value == "Complete" for store_task in tasks)
    # One Flux replica, max_ongoing_requests 1: it generates one task at a time. Pipelined (issue 21.5), a
    # finished generation is encoded and saved in the CPU stage while the replica runs the next, so a
    # second row may be In Progress meanwhile, never more than the CPU stage holds.
    spans = sorted(
        (entry["started"], entry["finished"])
        for entry in service["client"].get("/replicas").json()["Flux"]["recent"]
        if entry["task_id"] in ids
    )
    assert len(spans) == len(ids)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
    assert 1 <= peak <= 1 + CPU_STAGE_LIMIT


def test_cancel_a_running_task_frees_the_replica(service: dict):
    client = service["client"]
    long_task = submit(client, "vace", {"prompt": "long", "video_guide": str(service["inputs"] / "guide.mp4"),
                                        "resolution": "256x256", "num_inference_steps": 200, "video_length": 33})  # fmt: skip
    deadline = time.monotonic() + 120
    while client.get(f"/tasks/{long_task}").json()["progress"] <= 0:
        assert time.monotonic() < deadline, "the long task never reported progress"
        time.sleep(0.1)
    response = client.post(f"/tasks/{long_task}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "Cancelled"
    assert client.post(f"/tasks/{long_task}/cancel").status_code == 409

    started = time.monotonic()
    follow_up = submit(
        client, "vace", {**SMALL, "prompt": "next", "video_guide": str(service["inputs"] / "guide.mp4")}
    )
    task = wait_final(client, follow_up)
    assert task["status"] == "Complete", task["error_message"]
    assert time.monotonic() - started < 60  # the replica did not finish the 200 steps first
    cancelled = client.get(f"/tasks/{long_task}").json()
    assert cancelled["status"] == "Cancelled" and cancelled["output_location"] is None
    assert not (service["files"] / long_task).exists()


def replica_pid(deployment: str) -> int:
    """The process of the deployment's one live replica, asked of the replica actor itself (not through
    Serve's request path, where a stats call waits behind the replica's running generation)."""
    pids = set()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if (
            actor["namespace"] == "serve"
            and actor["name"].startswith("SERVE_REPLICA::")
            and (f"#{deployment}#" in actor["name"])
        ):
            handle = ray.get_actor(actor["name"], namespace="serve")
            try:
                pids.add(ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # a replica that died or is restarting
    assert len(pids) == 1, pids
    return pids.pop()


def test_killed_replica_task_is_retried_and_completes_once(service: dict):
    client = service["client"]
    task_id = submit(client, "t2v", {**SMALL, "prompt": "survive", "video_length": 33, "num_inference_steps": 100,
                                      "resolution": "256x256"})  # fmt: skip
    deadline = time.monotonic() + 120
    while client.get(f"/tasks/{task_id}").json()["progress"] <= 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = replica_pid("T2V")  # from Ray's actor table: /replicas waits behind a busy replica's generation
    os.kill(pid, signal.SIGKILL)

    task = wait_final(client, task_id, timeout_s=300)
    assert task["status"] == "Complete", task["error_message"]
    # Either Serve re-sent the request to the restarted replica, or the ingress requeued the task.
    assert task["attempts"] in (1, 2)
    assert replica_pid("T2V") != pid
    outputs = sorted(p.name for p in (service["files"] / task_id).iterdir())
    assert outputs == [f"{task_id}.mp4", f"thumb_{task_id[:8]}.jpg"]  # one output (and its thumbnail)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"task_type": "t2v", "params": {"video_length": "many"}}, 422, "video_length"),
        ({"task_type": "t2v", "params": {"resolution": "abc"}}, 422, "resolution"),
        ({"task_type": "t2v", "params": {"video_length": -3}}, 422, "video_length"),
        ({"task_type": "hunyuan", "params": {}}, 422, "task_type"),
        ({"task_type": "i2v", "params": {"prompt": "x", "image_start": "missing.png"}}, 422, "image_start"),
        ({"task_type": "i2v", "params": {"prompt": "x", "image_start": "/etc/passwd"}}, 422, "image_start"),
        ({"task_type": "t2v", "params": {"model": "no-such-model"}}, 422, "no-such-model"),
        ({"task_type": "t2v", "params": "not an object"}, 422, "params"),
        ({"task_type": "t2v", "dependant_on": str(uuid.uuid4())}, 422, "dependant_on"),
        ({"task_type": "t2v", "params": {"prompt": "x" * 10_000_000}}, 413, "limit"),
    ],
)
def test_bad_input_is_rejected_and_the_loop_keeps_running(
    service: dict, body: dict, status: int, needle: str
):
    client = service["client"]
    before = len(client.get("/tasks", params={"limit": 1000}).json())
    response = client.post("/tasks", json=body)
    assert response.status_code == status, response.text
    assert needle in response.text
    assert len(client.get("/tasks", params={"limit": 1000}).json()) == before
    assert client.get("/healthz").json()["status"] == "ok"


def test_unknown_and_missing_tasks(service: dict):
    client = service["client"]
    missing = str(uuid.uuid4())
    assert client.get(f"/tasks/{missing}").status_code == 404
    assert client.post(f"/tasks/{missing}/cancel").status_code == 404
    queued_elsewhere = str(uuid.uuid4())
    raw_execute(
        service["db"],
        "INSERT INTO tasks (id, task_type, params, status) VALUES (%s, 'hunyuan', '{}', 'Queued')",
        (queued_elsewhere,),
    )
    # Another worker pool's type is left queued (fail_unknown_task_types is off) and reported by /healthz.
    deadline = time.monotonic() + 60
    while client.get("/healthz").json().get("unserved_task_types", {}).get("hunyuan") != 1:
        assert time.monotonic() < deadline, client.get("/healthz").json()
        time.sleep(0.5)
    assert client.get(f"/tasks/{queued_elsewhere}").json()["status"] == "Queued"
    assert client.get("/tasks", params={"status": "Doing"}).status_code == 422
    assert client.get("/docs").status_code == 200
    assert "/tasks" in client.get("/openapi.json").json()["paths"]


def test_hwgp_cli_over_the_api(service: dict):
    api = str(service["client"].base_url)
    hwgp = [sys.executable, "-m", "db.cli", "--api", api]
    added = subprocess.run([*hwgp, "add-task", "--type", "flux", "--params", json.dumps({**SMALL, "prompt": "cli"})],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert added.returncode == 0, added.stderr
    task_id = added.stdout.strip()
    waited = subprocess.run(
        [*hwgp, "wait", task_id, "--timeout", "120"], capture_output=True, text=True, timeout=180
    )
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert f"files/{task_id}/" in waited.stdout
    bad = subprocess.run([*hwgp, "add-task", "--type", "t2v", "--params", '{"resolution": "abc"}'],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "resolution" in bad.stderr
    missing = subprocess.run([*hwgp, "show", str(uuid.uuid4())], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no task" in missing.stderr


def test_batch_entry_point_queues_a_chain_and_waits(service: dict, tmp_path: Path):
    lines = [
        {"task_type": "t2v", "params": {**SMALL, "prompt": "first", "video_length": 5}},
        {"task_type": "flux", "params": {**SMALL, "prompt": "second"}, "dependant_on": "#1"},
    ]
    jobs = tmp_path / "tasks.jsonl"
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    api = str(service["client"].base_url)
    run = subprocess.run([sys.executable, "-m", "dag.batch", str(jobs), "--api", api, "--poll", "0.5"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "summary: 2 complete, 0 failed" in run.stdout
    ids = [line.split()[0] for line in run.stdout.splitlines() if " Complete " in line]
    second = service["client"].get(f"/tasks/{ids[1]}").json()
    assert second["dependant_on"] == ids[0]

    before = len(service["client"].get("/tasks", params={"limit": 1000}).json())
    jobs.write_text(json.dumps(lines[0]) + "\n" + '{"task_type": "t2v", "params": [1]}\n')
    bad = subprocess.run([sys.executable, "-m", "dag.batch", str(jobs), "--api", api],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "line 2" in bad.stderr
    assert len(service["client"].get("/tasks", params={"limit": 1000}).json()) == before  # nothing queued


def test_shutdown_puts_unfinished_work_back_in_the_queue(service: dict):
    """Runs last: it deletes the application."""
    client = service["client"]
    guide = str(service["inputs"] / "guide.mp4")
    task_id = submit(client, "vace", {"prompt": "interrupted", "video_guide": guide, "resolution": "256x256",
                                      "num_inference_steps": 200, "video_length": 33})  # fmt: skip
    deadline = time.monotonic() + 120
    while client.get(f"/tasks/{task_id}").json()["progress"] <= 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    serve.delete("hwgp")
    with open_store(service["db"]) as store:
        task = store.get(task_id)
    assert task.status.value == "Queued", (task.status, task.error_message)
    assert task.worker_id is None and task.output_location is None
    assert not (service["files"] / task_id).exists()
