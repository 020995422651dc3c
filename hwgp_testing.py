"""Running the application on this machine and talking to it: helpers for tests, benchmarks and scripts
(kept out of the production packages)."""

from __future__ import annotations

import contextlib
import socket
import threading
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


def start_local_ray(**options: Any) -> None:
    """``ray.init(**options)``, a local cluster of its own, tried twice: on a loaded 2-core machine a raylet
    has been seen to miss Ray's fixed 30 s to register ("The current node timed out during startup")."""
    import ray

    try:
        ray.init(**options)
    except Exception as error:
        if "timed out during startup" not in str(error):
            raise
        ray.shutdown()  # the half-started node's processes
        ray.init(**options)


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
    start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus, **options)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="hwgp", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        # The cluster is this helper's own: ray.shutdown ends all its processes at once. A graceful
        # serve.shutdown first would cost seconds per app (each replica's drain loop); where the graceful
        # stop is what is tested, the test does it (tests/test_graceful_stop.py, test_serve.py).
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


class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL that can go down and come back on the same port:
    what clients see of a server restart (connections dropped, then refused, then accepted again)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.start()

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
