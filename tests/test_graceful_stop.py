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

from db.store import open_store
from deployments.local import free_port

pytestmark = pytest.mark.slow

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
                    "families": {"T2V": {"num_gpus": 0, "num_cpus": 0.1}},
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_hands_in_flight_tasks_back(tmp_path: Path, signum: signal.Signals):
    port = free_port()
    config = write_config(tmp_path, port, GRACE_S)
    log = tmp_path / "service.log"
    command = [sys.executable, "-m", "deployments.serve_run", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=service_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
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
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    output = log.read_text()
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as store:
        task = store.get(task_id)
    assert task.status.value == "Queued", f"{task}\n{output[-3000:]}"
    assert task.attempts == 0  # the shutdown refunded the attempt: it was not a failure
    assert task.worker_id is None and task.output_location is None and task.error_message is None
    assert "shut down" in (task.progress_message or "")
    assert not (tmp_path / "files" / task_id).exists()  # no partial output
    assert code == 0, output[-3000:]
    assert stopped_after < GRACE_S + 40
