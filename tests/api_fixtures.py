"""The real api over a real dispatcher, without Ray: a real SQLite tasks table, real output storage, real
routing (catalog, params models, limits, input checks, guarded fetcher) and a runner that stands in for
the GPUs (it reads the fetched inputs and returns a small artifact). For the security tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi.testclient import TestClient

from db.store import TaskStore, open_store
from deployments.api import create_app
from deployments.auth import ApiKeys
from deployments.config import TINY_DEFAULT_MODELS, IngressConfig
from deployments.dispatcher import BlockingPool, Dispatcher, Job, RunCancelled, RunResult
from deployments.limits import LimitSettings
from deployments.routing import Routing
from deployments.task_types import DAG_POOL, GENERATION, ORCHESTRATION, UTILITY, UTILITY_POOL
from hwgp_testing import free_port
from storage import InputFetcher, OutputStorage, StorageConfig
from Wan2GP.artifact import Artifact
from Wan2GP.catalog import Catalog

MODELS = {key: model for models in TINY_DEFAULT_MODELS.values() for key, model in models.items()}
CATALOG = Catalog.load(None)
FAST = {
    "poll_interval_s": 0.02,
    "heartbeat_interval_s": 0.05,
    "progress_interval_s": 0.0,
    "shutdown_grace_s": 0.0,
}


class InstantGpu:
    """A runner standing in for the family deployments: waits `delay_s` (cancellable), then returns an
    artifact naming the input bytes it was handed."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.inputs: dict[str, dict[str, Any]] = {}
        self.running = 0
        self.most_running = 0  # the most generations that ran at once

    async def run(self, job: Job) -> RunResult:
        stopped = asyncio.Event()
        job.on_cancel(stopped.set)
        self.inputs[job.task.id] = {k: len(v) for k, v in (job.inputs or {}).items() if isinstance(v, bytes)}
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.delay_s:
                with suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), self.delay_s)
        finally:
            self.running -= 1
        if stopped.is_set():
            raise RunCancelled
        return RunResult(
            Artifact(b"output of " + job.task.id.encode(), f"{job.task.id}.mp4", "video/mp4", {})
        )


@contextmanager
def api(
    tmp_path: Path,
    *,
    keys: list[dict] | None = None,
    limits: LimitSettings | None = None,
    runner: InstantGpu | None = None,
    input_url_allow: list[str] | None = None,
    fetch_timeout_s: float | None = None,
    capacity: int = 1,
    max_request_bytes: int = 200_000,
    db_query: str = "",
    over_http: bool = False,
    runners: Callable[[TaskStore, OutputStorage, InputFetcher, Routing], dict[str, Any]] | None = None,
) -> Iterator[tuple[TestClient, TaskStore, Dispatcher]]:
    """A started app: (client, store, dispatcher). The client is a TestClient, or with `over_http` an
    httpx client of a real server on loopback. `keys` are written to a keys file (auth on);
    `runners` makes runners (by kind) that replace the stand-in's."""
    store = open_store(f"sqlite:///{tmp_path / 'tasks.db'}{db_query}")
    storage = OutputStorage(StorageConfig(root=str(tmp_path / "files")))
    (tmp_path / "inputs").mkdir(exist_ok=True)
    fetcher = InputFetcher(
        [str(tmp_path / "inputs")],
        outputs=storage,
        cache_dir=tmp_path / "cache",
        input_url_allow=input_url_allow or [],
        fetch_timeout_s=fetch_timeout_s,
        env={},
    )
    routing = Routing(CATALOG, MODELS, fetcher, ["T2V", "VACE", "Flux"], limits=limits)
    runner = runner or InstantGpu()
    pool = BlockingPool(8)
    dispatcher = Dispatcher(
        store,
        storage,
        routing,
        {
            GENERATION: runner,
            ORCHESTRATION: runner,
            UTILITY: runner,
            **(runners(store, storage, fetcher, routing) if runners else {}),
        },
        {"T2V": capacity, "VACE": capacity, "Flux": capacity, DAG_POOL: 1, UTILITY_POOL: 1},
        IngressConfig(**FAST),
        pool=pool,
    )
    api_keys = None
    if keys is not None:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(keys))
        api_keys = ApiKeys(path)
    app = create_app(
        store=store,
        storage=storage,
        routing=routing,
        dispatcher=dispatcher,
        pool=pool,
        max_request_bytes=max_request_bytes,
        replica_stats=_replica_stats,
        keys=api_keys,
    )
    app.router.on_startup.append(dispatcher.start)
    app.router.on_shutdown.append(dispatcher.stop)
    try:
        if not over_http:
            with TestClient(app) as client:
                yield client, store, dispatcher
        else:  # a real HTTP server on loopback, for clients in other processes (the CLI, dag.batch)
            port = free_port()
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 10
            while not server.started:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.02)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                    yield client, store, dispatcher
            finally:
                server.should_exit = True
                thread.join(timeout=10)
    finally:
        fetcher.close()
        pool.close()
        store.close()


async def _replica_stats() -> dict[str, Any]:
    return {"T2V": {"host": "gpu-node-7", "pid": 4242}}
