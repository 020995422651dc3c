"""Running the application on a real local Ray cluster for end-to-end tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ray
from ray import serve

from deployments.app import build_app

FINAL = ("Complete", "Failed", "Cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(config: dict[str, Any]) -> Iterator[httpx.Client]:
    """A local Ray cluster with two fake GPUs, the application built from `config`, and a client for it."""
    port = free_port()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="hwgp", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_final(client: httpx.Client, task_id: str, timeout: float = 300) -> dict:
    """Poll the task until it is Complete, Failed or Cancelled."""
    deadline = time.monotonic() + timeout
    task: dict = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        if task["status"] in FINAL:
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish: {task}")
