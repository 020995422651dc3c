"""The dispatcher through real faults, without Ray: a SQLite database held locked by another connection
past the store's busy timeout, a real tmpfs that fills up, a loop whose store calls fail, a runner that
ignores a stop. Nothing finished is thrown away, nothing runs or completes twice, and /healthz says what
is wrong (issue 17 items 1, 3, 4, 5)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from disk_fixtures import files_under, fill_disk
from test_dispatcher import FakeGpu, in_loop, make_dispatcher, until

from db.errors import StoreUnavailable
from db.models import TaskStatus
from db.store import TaskStore, open_store
from deployments.api import create_app
from deployments.dispatcher import Dispatcher, Job, RunResult
from storage import OutputStorage, StorageConfig
from Wan2GP.artifact import Artifact


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    # A short busy timeout, so a lock held for a few seconds is an outage to every write.
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}?busy_timeout_s=0.3") as opened:
        yield opened


@pytest.fixture
def running() -> list[Dispatcher]:
    """Dispatchers a test started: `in_loop` stops them before its event loop closes."""
    return []


class DatabaseLock:
    """Another connection holding SQLite's write lock (BEGIN EXCLUSIVE) until `release`."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


class OnCue:
    """A runner that reports progress when told to, then returns an artifact: the generation in flight
    while the database goes away."""

    def __init__(self, size: int = 64):
        self.calls: list[str] = []
        self.report = asyncio.Event()
        self.finish = asyncio.Event()
        self.steps_reported = 0
        self.size = size

    async def run(self, job: Job) -> RunResult:
        self.calls.append(job.task.id)
        await self.report.wait()
        for step in range(1, 4):
            await job.progress(step, 3)  # the database is locked: these writes fail, the run goes on
            self.steps_reported = step
        await self.finish.wait()
        data = (job.task.id.encode() * self.size)[: self.size]
        return RunResult(Artifact(data, "out.mp4", "video/mp4", {}), "fake")


def api_client(dispatcher: Dispatcher) -> httpx.AsyncClient:
    app = create_app(
        store=dispatcher.store,
        storage=dispatcher.storage,
        routing=dispatcher.routing,
        dispatcher=dispatcher,
        pool=dispatcher.pool,
        max_request_bytes=100_000,
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@in_loop
async def test_a_database_outage_mid_run_loses_nothing_and_runs_nothing_twice(store, tmp_path, running):
    runner = OnCue()
    dispatcher = make_dispatcher(store, tmp_path, runner, {"T2V": 1}, stale_after_s=30)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: runner.calls == [task_id])

    lock = await asyncio.to_thread(DatabaseLock, tmp_path / "tasks.db")
    try:
        runner.report.set()  # progress writes fail (locked past the busy timeout), the run goes on
        await until(lambda: runner.steps_reported == 3, timeout_s=10)
        runner.finish.set()  # done during the outage: saved, then `complete` is retried
        await until(lambda: (tmp_path / "files" / task_id / "out.mp4").is_file())
        await asyncio.sleep(1.5)  # several failed complete attempts and heartbeats
        assert store.get(task_id).status == TaskStatus.IN_PROGRESS  # reads still work (WAL)
        async with api_client(dispatcher) as client:
            read = await client.get(f"/tasks/{task_id}")
            assert read.status_code in (200, 503), read.text
            write = await client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "y"}})
            assert write.status_code == 503 and write.headers["Retry-After"] == "5", write.text
            assert "unavailable" in write.json()["detail"]
            health = await client.get("/healthz")
            assert health.status_code == 503 and "heartbeat loop has not ticked" in health.text, health.text
        assert task_id in dispatcher.in_flight  # the artifact is kept, the claim still ours
    finally:
        await asyncio.to_thread(lock.release)

    await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE, timeout_s=15)
    task = store.get(task_id)
    assert task.attempts == 1 and runner.calls == [task_id]
    assert task.output_location.endswith(f"{task_id}/out.mp4")
    assert (tmp_path / "files" / task_id / "out.mp4").read_bytes() == (task_id.encode() * 64)[:64]
    await until(lambda: dispatcher.status().problems == [], timeout_s=5)


@in_loop
async def test_a_reclaimed_task_whose_output_is_stored_completes_without_running(store, tmp_path, running):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    task_id = store.add("t2v", {"prompt": "x"}).id
    # an earlier attempt stored the output, then lost the database before completing the row
    saved = dispatcher.storage.save(task_id, Artifact(b"earlier attempt", "out.mp4", "video/mp4", {}))
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE)
    assert gpu.calls == {} and store.get(task_id).output_location == saved.output_location


@in_loop
async def test_a_loop_that_cannot_reach_the_store_turns_healthz_503_naming_it(
    store, tmp_path, running, monkeypatch
):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1}, heartbeat_interval_s=0.1)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: gpu.started == [task_id])

    def unreachable(task_id: str, worker_id: str) -> bool:
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(store, "heartbeat", unreachable)  # only the heartbeat loop's calls break
    async with api_client(dispatcher) as client:
        await until(lambda: dispatcher.status().problems != [], timeout_s=5)
        health = await client.get("/healthz")
        assert health.status_code == 503, health.text
        (problem,) = health.json()["problems"]
        assert problem.startswith("heartbeat loop has not ticked") and "connection refused" in problem
        assert health.json()["loops"]["claim"]["error"] is None
        monkeypatch.undo()
        await until(lambda: dispatcher.status().problems == [], timeout_s=5)
        assert (await client.get("/healthz")).status_code == 200

        # a loop that dies is restarted, and still works
        dispatcher._loops["claim"].cancel()
        await until(lambda: dispatcher.status().loops["claim"]["restarts"] == 1)
        gpu.go.set()
        later = store.add("t2v", {"prompt": "later"}).id
        await until(lambda: store.get(later).status == TaskStatus.COMPLETE)
        assert (await client.get("/healthz")).status_code == 200
    assert store.get(task_id).status == TaskStatus.COMPLETE and store.get(task_id).attempts == 1


class Ignores:
    """A runner that never notices a stop (a wedged replica)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    async def run(self, job: Job) -> RunResult:
        self.started.append(job.task.id)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@in_loop
async def test_stop_hands_back_a_task_whose_runner_ignores_the_stop(store, tmp_path):
    runner = Ignores()
    dispatcher = make_dispatcher(store, tmp_path, runner, {"T2V": 1}, shutdown_grace_s=0.2)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    await until(lambda: runner.started == [task_id])
    started = asyncio.get_running_loop().time()
    await dispatcher.stop()
    took = asyncio.get_running_loop().time() - started
    task = store.get(task_id)
    assert task.status == TaskStatus.QUEUED and task.attempts == 0 and task.output_location is None
    assert took < 0.2 + 2.0 + 1.0, took  # grace, the stop notice, then the hand-back


# --- a full disk, through the dispatcher ----------------------------------------------------------


@in_loop
async def test_a_full_disk_keeps_the_artifact_until_space_returns(store, tmp_path, small_disk, running):
    runner = OnCue(size=300_000)
    runner.report.set()
    dispatcher = make_dispatcher(store, tmp_path, runner, {"T2V": 1})
    dispatcher.storage = OutputStorage(StorageConfig(root=str(small_disk / "files")))
    filler = fill_disk(small_disk, leave_free=100_000)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    runner.finish.set()
    await until(
        lambda: (
            dispatcher.in_flight.get(task_id) is not None and dispatcher.in_flight[task_id].phase == "storing"
        )
    )
    await asyncio.sleep(1.0)  # several failed saves
    assert store.get(task_id).status == TaskStatus.IN_PROGRESS
    files = small_disk / "files"
    assert not files.exists() or files_under(files) == []  # no truncated output, no temp file

    filler.unlink()  # space comes back
    await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE, timeout_s=15)
    output = small_disk / "files" / task_id / "out.mp4"
    assert output.read_bytes() == (task_id.encode() * 300_000)[:300_000]
    assert store.get(task_id).attempts == 1 and runner.calls == [task_id]


@in_loop
async def test_a_disk_full_past_the_bound_fails_readably_and_records_nothing(
    store, tmp_path, small_disk, running
):
    runner = OnCue(size=300_000)
    runner.report.set()
    runner.finish.set()
    dispatcher = make_dispatcher(store, tmp_path, runner, {"T2V": 1}, storage_retry_s=0.5, max_attempts=1)
    dispatcher.storage = OutputStorage(StorageConfig(root=str(small_disk / "files")))
    fill_disk(small_disk, leave_free=100_000)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: store.get(task_id).status.is_final, timeout_s=10)
    task = store.get(task_id)
    assert task.status == TaskStatus.FAILED
    assert "storing the output failed" in task.error_message and "No space left" in task.error_message
    assert not (small_disk / "files" / task_id / "out.mp4").exists()
    assert dispatcher.storage.find_saved(task_id) is None


@in_loop
async def test_heartbeats_go_on_during_the_shutdown_grace(store, tmp_path):
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1}, shutdown_grace_s=1.0)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    await until(lambda: gpu.started == [task_id])
    stopping = asyncio.ensure_future(dispatcher.stop())
    await asyncio.sleep(0.1)
    assert dispatcher.status().problems == ["stopping: in-flight tasks are finishing or being handed back"]
    beat = store.get(task_id).heartbeat_at
    await asyncio.sleep(0.5)
    assert store.get(task_id).heartbeat_at > beat  # the claim stays fresh while the task may still finish
    await stopping
    task = store.get(task_id)
    assert task.status == TaskStatus.QUEUED and task.attempts == 0 and gpu.cancelled == [task_id]


class SavesAStep:
    """A runner that stores a step's output through `job.blocking`, as an orchestration's segments do."""

    def __init__(self, storage: OutputStorage, step_row: str):
        self.storage, self.step_row = storage, step_row

    async def run(self, job: Job) -> RunResult:
        step = Artifact(b"s" * 300_000, "seg00_output.mp4", "video/mp4", {})
        await job.blocking(self.storage.save, self.step_row, step)
        return RunResult(Artifact(b"final", "final.mp4", "video/mp4", {}), "fake")


@in_loop
async def test_a_step_output_on_a_full_disk_waits_for_space(store, tmp_path, small_disk, running):
    storage = OutputStorage(StorageConfig(root=str(small_disk / "files")))
    step_row = store.add("travel_segment", {}).id
    runner = SavesAStep(storage, step_row)
    dispatcher = make_dispatcher(store, tmp_path, runner, {"T2V": 1})
    dispatcher.storage = storage
    filler = fill_disk(small_disk, leave_free=100_000)
    task_id = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await asyncio.sleep(1.0)  # the step's save fails, and is retried
    assert store.get(task_id).status == TaskStatus.IN_PROGRESS and storage.find_saved(step_row) is None
    filler.unlink()
    await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE, timeout_s=15)
    assert storage.find_saved(step_row).local_path.read_bytes() == b"s" * 300_000
    assert store.get(task_id).attempts == 1
