"""The guarded fetcher wired into the service (issue 16 items 3-4): inputs are downloaded before a
generation takes its deployment's capacity, on the fetcher's own threads, within a total deadline;
cancel aborts a download; /healthz and the lists keep answering whatever the downloads do.

The real api, dispatcher, routing, fetcher and SQLite; loopback HTTP servers (allowlisted) serve the
inputs, one of them a byte at a time."""

from __future__ import annotations

import time
from pathlib import Path

from api_fixtures import InstantGpu, api
from test_input_fetch import PNG, LoopbackServer

from db.models import TaskStatus


def test_slow_downloads_hold_no_capacity_and_never_stall_the_api(tmp_path: Path):
    server = LoopbackServer()
    runner = InstantGpu(delay_s=0.2)
    try:
        allow = [f"127.0.0.1:{server.port}"]
        with api(tmp_path, runner=runner, input_url_allow=allow, fetch_timeout_s=4) as (
            client,
            store,
            dispatcher,
        ):
            slow = []
            for i in range(5):  # five URLs: tasks naming one URL at once would share one download
                body = {
                    "task_type": "i2v",
                    "params": {"prompt": "x", "image_start": server.url(f"/trickle?n={i}")},
                }
                created = client.post("/tasks", json=body)
                assert created.status_code == 201, created.text
                slow.append(created.json()["id"])
            # A task without inputs runs on the one T2V slot while the five download.
            quick = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "y"}}).json()["id"]
            worst = 0.0
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                started = time.monotonic()
                health = client.get("/healthz")
                listed = client.get("/tasks")
                worst = max(worst, time.monotonic() - started)
                assert health.status_code == 200 and listed.status_code == 200
                time.sleep(0.05)
            assert worst < 1.0, f"/healthz + GET /tasks took {worst:.2f} s while downloads trickled"
            assert store.get(quick).status == TaskStatus.COMPLETE
            assert all(store.get(t).status == TaskStatus.IN_PROGRESS for t in slow)
            assert server.requests["/trickle"] >= 4  # they really were downloading

            # Cancel aborts a download at once.
            cancelled = client.post(f"/tasks/{slow[0]}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "Cancelled"
            started = time.monotonic()
            while slow[0] in dispatcher.status().in_flight_ids:
                assert time.monotonic() - started < 1.0, "the cancelled download did not stop"
                time.sleep(0.02)

            # The others fail at the total deadline with a message that reveals nothing of the server.
            for task_id in slow[1:]:
                while store.get(task_id).status == TaskStatus.IN_PROGRESS:
                    assert time.monotonic() - started < 15, "downloads were not cut at the deadline"
                    time.sleep(0.05)
                task = store.get(task_id)
                assert task.status in (TaskStatus.FAILED, TaskStatus.QUEUED), task
            failed = [store.get(t) for t in slow[1:] if store.get(t).status == TaskStatus.FAILED]
            assert failed and all(
                t.error_message == "image_start: could not fetch the URL: the server did not answer in time"
                for t in failed
            ), [t.error_message for t in failed]
            assert runner.most_running == 1
    finally:
        server.stop()


def test_fetched_inputs_reach_the_runner_without_oversubscribing_the_deployment(tmp_path: Path):
    server = LoopbackServer()
    runner = InstantGpu(delay_s=0.3)
    try:
        allow = [f"127.0.0.1:{server.port}"]
        with api(tmp_path, runner=runner, input_url_allow=allow) as (client, store, _):
            ids = [client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "a"}}).json()["id"]]
            for _ in range(3):
                body = {"task_type": "i2v", "params": {"prompt": "x", "image_start": server.url("/img.png")}}
                ids.append(client.post("/tasks", json=body).json()["id"])
            deadline = time.monotonic() + 10
            while not all(store.get(t).status == TaskStatus.COMPLETE for t in ids):
                assert time.monotonic() < deadline, [store.get(t).status for t in ids]
                time.sleep(0.05)
            assert runner.most_running == 1  # capacity 1: downloads never let a second one in
            assert [runner.inputs[t] for t in ids[1:]] == [{"image_start": len(PNG)}] * 3
            assert runner.inputs[ids[0]] == {}
    finally:
        server.stop()


def test_input_videos_are_checked_against_the_decode_limits_before_they_run(tmp_path: Path):
    import numpy as np

    from deployments.limits import LimitSettings
    from Wan2GP.video import encode_mp4

    guide = encode_mp4(np.zeros((12, 32, 48, 3), dtype=np.uint8), fps=8)
    runner = InstantGpu()
    body = {"task_type": "vace", "params": {"prompt": "x", "model": "tiny-vace", "video_guide": "guide.mp4"}}
    for run, (limits, expected) in enumerate(
        [
            (LimitSettings(max_decoded_frames=8), "video_guide: the video has 12 frames; the limit is 8"),
            (
                LimitSettings(max_decoded_pixels=12 * 32 * 48 - 1),
                "video_guide: the video decodes to 12 frames of 48x32",
            ),
            (LimitSettings(), None),
        ]
    ):
        folder = tmp_path / f"run{run}"
        (folder / "inputs").mkdir(parents=True)
        (folder / "inputs" / "guide.mp4").write_bytes(guide)
        with api(folder, runner=runner, limits=limits) as (client, store, _):
            task_id = client.post("/tasks", json=body).json()["id"]
            deadline = time.monotonic() + 10
            while not (task := store.get(task_id)).status.is_final:
                assert time.monotonic() < deadline, task
                time.sleep(0.02)
            if expected is None:
                assert task.status == TaskStatus.COMPLETE and runner.inputs[task_id]["video_guide"] > 0
            else:
                assert task.status == TaskStatus.FAILED and task.error_message.startswith(expected), task
                assert task_id not in runner.inputs  # refused before the GPU saw it
