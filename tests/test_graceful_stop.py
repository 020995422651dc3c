"""Graceful stop of a real service process: SIGTERM or SIGINT hands every in-flight task back.

Each case starts the service as its own process on its own local Ray cluster (tiny models, SQLite on
tmp paths), queues a generation slow enough to still be running, waits until it is `In Progress`, sends a
real signal to the process and checks that the process exits and the row is `Queued` again with its
attempt refunded and no output recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from db.models import TaskStatus
from db.store import new_task, open_store
from deployments.recovery import identity_of, new_worker_id, requeue_predecessors, stable_identity
from hwgp_testing import free_port

REPO = Path(__file__).resolve().parent.parent
SLOW_T2V = {"prompt": "slow", "model": "tiny-t2v", "resolution": "256x256", "num_inference_steps": 200,
            "video_length": 33}  # fmt: skip
GRACE_S = 3.0


def service_env() -> dict[str, str]:
    """The environment of a service process: its own new local cluster, never one already running here."""
    return {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def write_config(folder: Path, port: int, grace_s: float) -> Path:
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "hwgp",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": {
                    "db": f"sqlite:///{folder / 'tasks.db'}",
                    "storage": {"root": str(folder / "files")},
                    "models": "tiny",
                    "deployments": {"T2V": {"num_gpus": 0, "num_cpus": 0.1}},
                    "ingress": {
                        "num_cpus": 0.1,
                        "heartbeat_interval_s": 0.5,
                        "poll_interval_s": 0.2,
                        "progress_interval_s": 0,
                        "shutdown_grace_s": grace_s,
                    },
                },
            }
        ],
    }
    path = folder / "serve_config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def wait_healthy(client: httpx.Client, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the service exited early:\n{log.read_text()[-4000:]}"
        try:
            if client.get("/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the service did not become healthy in {timeout_s} s:\n{log.read_text()[-4000:]}")


def wait_running(client: httpx.Client, task_id: str, timeout_s: float = 60) -> dict:
    """Until the task is In Progress and its generation has reported a denoising step."""
    deadline = time.monotonic() + timeout_s
    task: dict = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        if task["status"] == "In Progress" and task["progress"] > 0:
            return task
        assert task["status"] in ("Queued", "In Progress"), task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never started generating: {task}")


def start_service(
    folder: Path, port: int, command: list[str], log_name: str
) -> tuple[subprocess.Popen, Path]:
    log = folder / log_name
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, str(folder / "serve_config.yaml")],
            cwd=REPO,
            env=service_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


def stop_for_good(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


GRACEFUL = [sys.executable, "-m", "deployments.serve_run"]
PLAIN_SERVE_RUN = [str(Path(sys.executable).parent / "serve"), "run"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_hands_in_flight_tasks_back(tmp_path: Path, signum: signal.Signals):
    port = free_port()
    write_config(tmp_path, port, GRACE_S)
    process, log = start_service(tmp_path, port, GRACEFUL, "service.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, process, log)
            response = client.post("/tasks", json={"task_type": "t2v", "params": SLOW_T2V})
            assert response.status_code == 201, response.text
            task_id = response.json()["id"]
            running = wait_running(client, task_id)
            assert running["attempts"] == 1

            signalled = time.monotonic()
            process.send_signal(signum)
            code = process.wait(timeout=GRACE_S + 40)
            stopped_after = time.monotonic() - signalled
    finally:
        stop_for_good(process)

    output = log.read_text()
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as store:
        task = store.get(task_id)
    assert task.status.value == "Queued", f"{task}\n{output[-3000:]}"
    assert task.attempts == 0  # the shutdown refunded the attempt: it was not a failure
    assert task.worker_id is None and task.output_location is None and task.error_message is None
    assert "shut down" in (task.progress_message or "")
    assert not (tmp_path / "files" / task_id).exists()  # no partial output
    assert code == 0, output[-3000:]
    # The grace, the hand-back, then Serve's and Ray's own teardown (about 10 s on a busy 2-core machine).
    assert stopped_after < GRACE_S + 25, stopped_after
    print(f"{signum.name}: stopped {stopped_after:.1f} s after the signal")


@pytest.mark.slow
def test_a_restart_takes_back_what_a_hard_stopped_service_held(tmp_path: Path):
    """Plain `serve run` dies on SIGTERM with the task still In Progress (Ray's SIGTERM handler exits and
    tears the cluster down); the next start of the service requeues it at once, long before it is stale."""
    port = free_port()
    write_config(tmp_path, port, GRACE_S)
    process, log = start_service(tmp_path, port, PLAIN_SERVE_RUN, "first.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, process, log)
            task_id = client.post("/tasks", json={"task_type": "t2v", "params": SLOW_T2V}).json()["id"]
            held = wait_running(client, task_id)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    finally:
        stop_for_good(process)
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as store:
        orphan = store.get(task_id)
    assert orphan.status == TaskStatus.IN_PROGRESS and orphan.worker_id == held["worker_id"]

    restarted, log = start_service(tmp_path, port, GRACEFUL, "second.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, restarted, log)
            # Released by the new incarnation's first maintenance (attempt refunded), then claimed again
            # by it: long before the 60 s stale_after_s.
            deadline = time.monotonic() + 10
            task = client.get(f"/tasks/{task_id}").json()
            while task["worker_id"] in (None, held["worker_id"]) and time.monotonic() < deadline:
                time.sleep(0.2)
                task = client.get(f"/tasks/{task_id}").json()
            assert task["attempts"] == 1, task
            assert task["worker_id"] != held["worker_id"]
            assert identity_of(task["worker_id"]) == identity_of(held["worker_id"])
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=GRACE_S + 40)
    finally:
        stop_for_good(restarted)
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as store:
        assert store.get(task_id).status == TaskStatus.QUEUED


# --- the restart's requeue, on a real SQLite store ----------------------------------------------------------


def test_requeue_predecessors_releases_only_silent_earlier_incarnations(tmp_path: Path):
    identity = stable_identity("hwgp", host="node-a")
    dead, alive, me = new_worker_id(identity), new_worker_id(identity), new_worker_id(identity)
    stranger = new_worker_id(stable_identity("hwgp", host="node-b"))
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as store:
        ids = {}
        for owner in ("dead", "alive", "stranger", "legacy", "me"):
            ids[owner] = store.create(new_task(task_type="t2v", params={"prompt": owner})).id
        for owner, worker in [("dead", dead), ("alive", alive), ("stranger", stranger),
                              ("legacy", "ingress-node-a-1234-abcdef"), ("me", me)]:  # fmt: skip
            assert store.claim_next(worker, ["t2v"], 1)[0].id == ids[owner]  # oldest first
        time.sleep(1.2)
        for worker, owner in [(alive, "alive"), (stranger, "stranger")]:
            assert store.heartbeat(ids[owner], worker)  # alive ones keep heartbeating

        released = requeue_predecessors(store, me, silent_for_s=1.0)

        assert [task.id for task in released] == [ids["dead"]]
        dead_task = store.get(ids["dead"])
        assert (
            dead_task.status == TaskStatus.QUEUED and dead_task.attempts == 0 and dead_task.worker_id is None
        )
        assert me in dead_task.progress_message and dead in dead_task.progress_message
        for owner in ("alive", "stranger", "legacy", "me"):
            assert store.get(ids[owner]).status == TaskStatus.IN_PROGRESS, owner
        # The other node's silent rows are not ours to take, however old.
        time.sleep(1.2)
        assert requeue_predecessors(store, me, silent_for_s=1.0) == [store.get(ids["alive"])]


def test_worker_ids_carry_their_identity():
    identity = stable_identity("hwgp", host="h")
    assert identity == "ingress-h-hwgp"
    first, second = new_worker_id(identity), new_worker_id(identity)
    assert first != second and identity_of(first) == identity_of(second) == identity
    assert identity_of("ingress-h-1234-abcdef") is None
    with pytest.raises(ValueError, match="no stable identity"):
        requeue_predecessors(None, "ingress-h-1234-abcdef", silent_for_s=1)  # type: ignore[arg-type]
