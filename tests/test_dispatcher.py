"""The dispatcher and the api without Ray: a real SQLite tasks table, real output storage, real routing
(catalog, params models, input checks), and plain async runners standing in for the GPUs."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from db.models import TaskStatus
from db.store import InvalidTask, TaskStore, open_store
from deployments.api import create_app
from deployments.config import TINY_DEFAULT_MODELS, AppConfig, IngressConfig
from deployments.dispatcher import BlockingPool, Dispatcher, Job, RunCancelled, RunResult, TaskFailure
from deployments.routing import Routing
from deployments.task_types import (
    DAG_POOL,
    GENERATION,
    MANAGED,
    PERSPECTIVE_FINAL,
    TRAVEL_SEGMENT,
    TRAVEL_STITCH,
    UTILITY,
    UTILITY_POOL,
    of_kind,
    pool_task_types,
    step_deployment,
)
from storage import InputFetcher, OutputStorage, StorageConfig
from Wan2GP.artifact import Artifact
from Wan2GP.catalog import Catalog

FAST = {
    "poll_interval_s": 0.02,
    "heartbeat_interval_s": 0.05,
    "progress_interval_s": 0.0,
    "shutdown_grace_s": 0.0,
}
MODELS = {key: model for models in TINY_DEFAULT_MODELS.values() for key, model in models.items()}
CATALOG = Catalog.load(None)


class FakeGpu:
    """A runner standing in for a family deployment: waits until `go` is set (or it is cancelled),
    reports progress, then returns a small artifact or does what `behaviour` says."""

    def __init__(self, behaviour: Callable[[Job, int], None] | None = None, steps: int = 0):
        self.go = asyncio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.calls: dict[str, int] = {}
        self.behaviour = behaviour
        self.steps = steps
        self.after_step: Callable[[Job, int], None] | None = None

    async def run(self, job: Job) -> RunResult:
        task_id = job.task.id
        self.started.append(task_id)
        self.calls[task_id] = self.calls.get(task_id, 0) + 1
        stopped = asyncio.Event()
        job.on_cancel(lambda: (self.cancelled.append(task_id), stopped.set()))
        for step in range(1, self.steps + 1):
            await job.progress(step, self.steps)
            if self.after_step is not None:
                self.after_step(job, step)
        if self.behaviour is not None:
            self.behaviour(job, self.calls[task_id])
        go = asyncio.ensure_future(self.go.wait())
        stop = asyncio.ensure_future(stopped.wait())
        await asyncio.wait([go, stop], return_when=asyncio.FIRST_COMPLETED)
        go.cancel(), stop.cancel()
        if stopped.is_set():
            raise RunCancelled
        return RunResult(
            Artifact(b"frames of " + task_id.encode(), f"{task_id}.mp4", "video/mp4", {}), "fake"
        )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as opened:
        yield opened


def make_dispatcher(
    store: TaskStore, tmp_path: Path, runner: FakeGpu, capacity: dict[str, int], **settings
) -> Dispatcher:
    storage = OutputStorage(StorageConfig(root=str(tmp_path / "files")))
    (tmp_path / "inputs").mkdir(exist_ok=True)
    fetcher = InputFetcher([str(tmp_path / "inputs")], outputs=storage)
    routing = Routing(CATALOG, MODELS, fetcher, ["T2V", "VACE", "Flux"])
    return Dispatcher(
        store,
        storage,
        routing,
        {GENERATION: runner, UTILITY: runner},
        capacity,
        IngressConfig(**{**FAST, **settings}),
        pool=BlockingPool(4),
    )


@pytest.fixture
def running() -> list[Dispatcher]:
    """Dispatchers a test started: `in_loop` stops them before its event loop closes."""
    return []


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs) -> None:
        async def main() -> None:
            try:
                await test(*args, **kwargs)
            finally:
                for dispatcher in kwargs.get("running", []):
                    await dispatcher.stop()

        asyncio.run(main())

    return wrapper


async def until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def statuses(store: TaskStore) -> dict[str, int]:
    return {s.value: n for s, n in store.count_by_status().items() if n}


@in_loop
async def test_claims_only_up_to_capacity_then_completes_everything(store, tmp_path, running):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 2, "Flux": 1})
    ids = [store.add("t2v", {"prompt": f"cat {i}"}).id for i in range(5)]
    flux = store.add("flux", {"prompt": "a red square"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: len(gpu.started) == 3)
    await asyncio.sleep(0.1)  # several more polls: nothing more may be claimed
    assert statuses(store) == {"In Progress": 3, "Queued": 3}
    assert dispatcher.status().in_flight == {"T2V": 2, "Flux": 1}
    assert dispatcher.status().capacity == {"T2V": 2, "Flux": 1}
    assert flux in gpu.started
    gpu.go.set()
    await until(lambda: statuses(store) == {"Complete": 6})
    for task_id in [*ids, flux]:
        task = store.get(task_id)
        assert task.output_location and task.output_location.endswith(f"{task_id}/{task_id}.mp4")
        assert (
            tmp_path / "files" / task_id / f"{task_id}.mp4"
        ).read_bytes() == b"frames of " + task_id.encode()


@in_loop
async def test_progress_writes_are_rate_limited(store, tmp_path, running):
    gpu = FakeGpu(steps=10)
    seen: list[float] = []
    gpu.after_step = lambda job, step: seen.append(store.get(job.task.id).progress)
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1}, progress_interval_s=60)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: len(seen) == 10)
    # the first step is written, then nothing for 60 s, except the last step
    assert seen == [0.1] * 9 + [0.99]
    assert store.get(task_id).progress_message.startswith("step 10/10")


@in_loop
async def test_heartbeats_the_task_and_its_mirror_rows(store, tmp_path, running):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    child = store.add("travel_segment", {"segment_index": 0}).id
    gpu.behaviour = lambda job, _: (store.start(child, dispatcher.worker_id), job.watch_rows([child]))
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: gpu.started == [task_id])
    first, first_child = store.get(task_id).heartbeat_at, store.get(child).heartbeat_at
    await asyncio.sleep(0.3)
    assert store.get(task_id).heartbeat_at > first
    assert store.get(child).heartbeat_at > first_child


@in_loop
async def test_a_cancelled_row_stops_its_runner(store, tmp_path, running):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: gpu.started == [task_id])
    store.cancel(task_id)  # written by someone else: the heartbeat notices
    await until(lambda: gpu.cancelled == [task_id])
    await until(lambda: not dispatcher.in_flight)
    task = store.get(task_id)
    assert task.status == TaskStatus.CANCELLED and task.output_location is None
    assert not (tmp_path / "files" / task_id).exists()


def fail_with(error: Exception) -> Callable[[Job, int], None]:
    def behaviour(job: Job, call: int) -> None:
        if call == 1:
            raise error

    return behaviour


@in_loop
async def test_a_failure_is_recorded_with_its_message(store, tmp_path, running):
    gpu = FakeGpu(fail_with(TaskFailure("video_guide: not a video")))
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    task_id = store.add("t2v", {"prompt": "x"}).id
    dependant = store.add("t2v", {"prompt": "after"}, dependant_on=task_id).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: store.get(dependant).status.is_final)
    task = store.get(task_id)
    assert task.status == TaskStatus.FAILED and task.error_message == "video_guide: not a video"
    assert store.get(dependant).status == TaskStatus.FAILED and task_id in store.get(dependant).error_message
    assert gpu.calls == {task_id: 1}  # not retried, and the dependant never ran


@in_loop
async def test_a_crashed_runner_is_retried_until_attempts_run_out(store, tmp_path, running):
    task_id = store.add("t2v", {"prompt": "x"}).id
    gpu = FakeGpu(
        lambda job, call: (
            fail_with(ConnectionError("replica died"))(job, call) if job.task.id == task_id else None
        )
    )
    gpu.go.set()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    dependant = store.add("t2v", {"prompt": "after"}, dependant_on=task_id).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: store.get(dependant).status.is_final)
    assert store.get(task_id).status == TaskStatus.COMPLETE and store.get(task_id).attempts == 2
    assert store.get(dependant).status == TaskStatus.COMPLETE
    assert gpu.started == [task_id, task_id, dependant]  # the dependant ran only after it completed

    always = FakeGpu(lambda job, call: (_ for _ in ()).throw(ConnectionError("replica died")))
    other = make_dispatcher(store, tmp_path, always, {"Flux": 1}, max_attempts=2)
    flux = store.add("flux", {"prompt": "x"}).id
    other.start()
    running.append(other)
    await until(lambda: store.get(flux).status.is_final)
    task = store.get(flux)
    # The owner reads the kind of fault; its details (node, process) are only in the log.
    assert task.status == TaskStatus.FAILED and task.error_message == "replica error: ConnectionError"
    assert always.calls == {flux: 2}


@in_loop
async def test_stop_hands_unfinished_tasks_back_without_spending_an_attempt(store, tmp_path):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 2})
    ids = [store.add("t2v", {"prompt": f"x{i}"}).id for i in range(2)]
    dispatcher.start()
    await until(lambda: len(gpu.started) == 2)
    await dispatcher.stop()
    assert sorted(gpu.cancelled) == sorted(ids)
    for task_id in ids:
        task = store.get(task_id)
        assert task.status == TaskStatus.QUEUED and task.worker_id is None and task.attempts == 0
        assert "shut down" in task.progress_message
    assert not (tmp_path / "files").exists()
    assert not dispatcher.status().running


@in_loop
async def test_stop_lets_work_that_ends_within_the_grace_period_complete(store, tmp_path):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1}, shutdown_grace_s=5.0)
    task_id = store.add("t2v", {"prompt": "x"}).id
    later = store.add("t2v", {"prompt": "y"}).id
    dispatcher.start()
    await until(lambda: gpu.started == [task_id])
    asyncio.get_running_loop().call_later(0.2, gpu.go.set)
    await dispatcher.stop()
    assert store.get(task_id).status == TaskStatus.COMPLETE and gpu.cancelled == []
    assert store.get(later).status == TaskStatus.QUEUED  # nothing new is claimed while stopping


@in_loop
async def test_rows_written_directly_are_checked_at_claim_and_unknown_types_are_reported(
    store, tmp_path, running
):
    gpu = FakeGpu()
    gpu.go.set()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1, UTILITY_POOL: 1})
    bad = store.add("t2v", {"resolution": "abc"}).id
    bad_model = store.add("t2v", {"model": "no-such-model"}).id
    unknown = [store.add("hunyuan", {}).id, store.add("hunyuan", {}).id, store.add("qwen_image_edit", {}).id]
    mirror = store.add("travel_segment", {}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: all(store.get(i).status.is_final for i in (bad, bad_model)))
    assert "resolution" in store.get(bad).error_message
    assert "no-such-model" in store.get(bad_model).error_message
    # another worker pool sharing the table may serve them: left queued, reported (healthz, metrics)
    await until(lambda: dispatcher.status().unserved == {"hunyuan": 2, "qwen_image_edit": 1})
    assert all(store.get(i).status == TaskStatus.QUEUED for i in unknown)
    assert store.get(mirror).status == TaskStatus.QUEUED  # driven by its orchestrator, never failed here
    assert gpu.started == []

    await dispatcher.stop()
    failing = make_dispatcher(store, tmp_path, gpu, {"T2V": 1}, fail_unknown_task_types=True)
    failing.start()
    running.append(failing)
    await until(lambda: all(store.get(i).status.is_final for i in unknown))
    assert all("not served" in store.get(i).error_message for i in unknown)
    assert failing.status().unserved == {} and store.get(mirror).status == TaskStatus.QUEUED


def test_blocking_calls_run_on_the_pool_not_the_event_loop(store, tmp_path):
    threads: list[str] = []
    gpu = FakeGpu()
    gpu.go.set()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    original = dispatcher.storage.save

    def save(task_id, artifact):
        import threading

        threads.append(threading.current_thread().name)
        return original(task_id, artifact)

    dispatcher.storage.save = save  # type: ignore[method-assign]

    async def scenario() -> None:
        task_id = store.add("t2v", {"prompt": "x"}).id
        dispatcher.start()
        await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE)
        await dispatcher.stop()

    asyncio.run(scenario())
    assert threads and all(name.startswith("hwgp-blocking") for name in threads)


# --- the api over a dispatcher with fake runners ------------------------------------------------------


@pytest.fixture
def client(store: TaskStore, tmp_path: Path) -> Iterator[TestClient]:
    dispatcher = make_dispatcher(store, tmp_path, FakeGpu(), {"T2V": 1, DAG_POOL: 1, UTILITY_POOL: 1})
    app = create_app(
        store=store,
        storage=dispatcher.storage,
        routing=dispatcher.routing,
        dispatcher=dispatcher,
        pool=dispatcher.pool,
        max_request_bytes=10_000,
    )
    with TestClient(app) as test_client:
        yield test_client


def test_api_maps_domain_errors(client: TestClient, store: TaskStore):
    created = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "a cat"}})
    assert created.status_code == 201 and created.json()["status"] == "Queued"
    task_id = created.json()["id"]
    assert client.get("/tasks/00000000-0000-0000-0000-000000000000").status_code == 404
    assert client.post("/tasks/00000000-0000-0000-0000-000000000000/cancel").status_code == 404
    assert client.post(f"/tasks/{task_id}/cancel").json()["status"] == "Cancelled"
    again = client.post(f"/tasks/{task_id}/cancel")
    assert again.status_code == 409 and "Cancelled" in again.text
    assert client.get(f"/tasks/{task_id}/output").status_code == 409

    cases = [
        ({"task_type": "t2v", "params": {"video_length": "many"}}, ["body", "params", "video_length"]),
        ({"task_type": "t2v", "params": {"model": "no-such-model"}}, ["body", "params", "model"]),
        ({"task_type": "hunyuan"}, ["body", "task_type"]),
        ({"task_type": "i2v", "params": {"image_start": "/etc/passwd"}}, ["body", "params", "image_start"]),
        ({"task_type": "join_clips", "params": {"clips": ["a.mp4"]}}, ["body", "params", "clips"]),
        ({"task_type": "travel_orchestrator", "params": {"images": []}}, ["body", "params"]),
    ]
    for body, loc in cases:
        response = client.post("/tasks", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"][0]["loc"][: len(loc)] == loc, response.text
    bad_status = client.get("/tasks", params={"status": "Doing"})
    assert bad_status.status_code == 422 and bad_status.json()["detail"][0]["loc"] == ["query", "status"]
    assert store.count_by_status()[TaskStatus.QUEUED] == 0  # nothing refused was written


def test_api_refuses_oversized_bodies_even_chunked(client: TestClient, store: TaskStore):
    big = {"task_type": "t2v", "params": {"prompt": "x" * 20_000}}
    response = client.post("/tasks", json=big)
    assert response.status_code == 413 and "limit is 10000" in response.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"task_type": "t2v", "params": {"prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}}'

    chunked = client.post("/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "limit is 10000" in chunked.text
    small = client.post("/tasks", content=iter([b'{"task_type": "t2v", ', b'"params": {"prompt": "ok"}}']),
                        headers={"content-type": "application/json"})  # fmt: skip
    assert small.status_code == 201, small.text
    assert store.count_by_status()[TaskStatus.QUEUED] == 1


def test_api_healthz_reports_the_dispatcher_view(client: TestClient):
    health = client.get("/healthz")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["capacity"] == {"T2V": 1, DAG_POOL: 1, UTILITY_POOL: 1}
    assert body["in_flight"] == {"T2V": 0, DAG_POOL: 0, UTILITY_POOL: 0}
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/tasks", "/healthz"}


def test_the_registry_routes_every_task_type():
    assert pool_task_types("T2V") == (
        "t2v",
        "t2v_22",
        "i2v",
        "i2v_22",
        "flf2v",
        "single_image",
        "generate_video",
    )
    assert pool_task_types("VACE") == ("vace", "vace_21", "vace_22")
    assert pool_task_types("Flux") == ("flux", "magic_edit")
    assert pool_task_types(DAG_POOL) == (
        "travel_orchestrator",
        "different_perspective_orchestrator",
        "join_clips_segment",
        "join_clips_orchestrator",
        "inpaint_frames",
        "edit_video_orchestrator",
        "individual_travel_segment",
    )
    assert set(pool_task_types(UTILITY_POOL)) == {
        "generate_openpose", "rife_interpolate_images", "extract_frame", "join_clips"
    }  # fmt: skip
    assert step_deployment("travel_orchestrator") == "VACE"
    assert of_kind(MANAGED) == (TRAVEL_SEGMENT, TRAVEL_STITCH, PERSPECTIVE_FINAL)
    # without the deployment their steps need, orchestrations are not served
    routing = Routing(CATALOG, MODELS, InputFetcher([]), ["T2V", "Flux"])
    assert "travel_orchestrator" not in routing.served_task_types and "vace" not in routing.served_task_types
    assert routing.route("single_image", {"model": "tiny-flux"}).pool == "Flux"
    with pytest.raises(InvalidTask, match="not served"):
        routing.route("vace", {})


def test_families_is_a_deprecated_alias_of_deployments(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        config = AppConfig.model_validate({"families": {"VACE": {"replicas": 2}}})
    assert list(config.deployments) == ["VACE"] and config.deployments["VACE"].replicas == 2
    assert "deprecated" in caplog.text
    with pytest.raises(ValueError, match="Wan"):
        AppConfig.model_validate({"deployments": {"Wan": {}}})


def test_the_ingress_imports_no_model_code():
    """The ingress process validates and routes tasks but never runs a model: importing it must not pull in
    torch or diffusers (seconds of CPU at every service start, on every replica of the ingress)."""
    import subprocess
    import sys

    probe = "import sys, deployments.ingress; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
