"""Running the application on this machine and talking to it: helpers for tests, benchmarks and scripts
(kept out of the production packages)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

FINAL = ("Complete", "Failed", "Cancelled")


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(
    config: dict[str, Any], num_gpus: int = 2, num_cpus: int = 2, ray_init: dict[str, Any] | None = None
) -> Iterator[httpx.Client]:
    """A local Ray cluster (`num_gpus` may be fake), the application built from `config`, and a client for it.

    `ray_init`: more `ray.init` keywords, e.g. `{"_metrics_export_port": port}` for Prometheus metrics."""
    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    options = {"include_dashboard": False, "log_to_driver": False, **(ray_init or {})}
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **options)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="hwgp", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_final(client: httpx.Client, task_id: str, timeout_s: float = 300, poll_s: float = 0.2) -> dict:
    """Poll the task until it is Complete, Failed or Cancelled; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    task: dict = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        if task["status"] in FINAL:
            return task
        time.sleep(poll_s)
    raise AssertionError(f"task {task_id} did not finish in {timeout_s} s: {task}")


def wait_complete(client: httpx.Client, task_id: str, timeout_s: float = 3600, poll_s: float = 0.05) -> dict:
    """`wait_final`, raising RuntimeError unless the task completed."""
    task = wait_final(client, task_id, timeout_s, poll_s)
    if task["status"] != "Complete":
        raise RuntimeError(f"task {task_id}: {task['status']}: {task.get('error_message')}")
    return task
