"""Prefetch (deployments/prefetch.py) without Ray: the dispatcher over a real SQLite table and real routing,
with a runner that records the prefetches it is asked for. A task waiting on a running one gets its model
loaded on a free replica, once, one at a time per deployment, never over a model a task needs."""

from __future__ import annotations

import asyncio
from typing import Any

from db.models import TaskStatus
from deployments.dispatcher import Job, RunResult
from deployments.task_types import DAG_POOL
from tests.test_dispatcher import FakeGpu, in_loop, make_dispatcher, running, statuses, store, until

__all__ = ["running", "store"]  # fixtures used by name

WAN22 = {"prompt": "x", "model": "tiny-t2v-22"}


class PrefetchingGpu(FakeGpu):
    """FakeGpu that also records `prefetch(deployment, model_id)` calls; each waits for `loaded` to be set."""

    def __init__(self) -> None:
        super().__init__()
        self.prefetched: list[tuple[str, str]] = []
        self.loaded = asyncio.Event()
        self.models: dict[str, str] = {}  # task id -> the model its job was routed to

    async def prefetch(self, deployment: str, model_id: str) -> dict[str, Any]:
        self.prefetched.append((deployment, model_id))
        await self.loaded.wait()
        return {"model": model_id, "seconds": 0.5, "reused": False}

    async def run(self, job: Job) -> RunResult:
        self.models[job.task.id] = job.model_id
        return await super().run(job)


@in_loop
async def test_a_task_waiting_on_a_running_one_gets_its_model_loaded_once(store, tmp_path, running):
    gpu = PrefetchingGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 2})
    first = store.add("t2v", {"prompt": "x"}).id
    second = store.add("t2v", WAN22, dependant_on=first).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: gpu.prefetched == [("T2V", "tiny-t2v-22")])
    assert dispatcher.status().prefetch["in_flight"] == ["T2V"]
    gpu.loaded.set()
    await until(lambda: dispatcher.status().prefetch["in_flight"] == [])
    await asyncio.sleep(0.2)  # many more polls: the same task is not prefetched again
    assert gpu.prefetched == [("T2V", "tiny-t2v-22")]
    assert {k: v for k, v in dispatcher.status().prefetch.items() if k != "in_flight"} == {
        "started": 1,
        "loaded": 1,
        "failed": 0,
    }
    assert store.get(second).status == TaskStatus.QUEUED  # still waits for its dependency
    gpu.go.set()
    await until(lambda: statuses(store) == {"Complete": 2})
    assert gpu.models == {first: "tiny-t2v", second: "tiny-t2v-22"}


@in_loop
async def test_no_prefetch_without_a_free_replica_or_a_different_model(store, tmp_path, running):
    gpu = PrefetchingGpu()
    gpu.loaded.set()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})  # the only replica runs the first task
    first = store.add("t2v", {"prompt": "x"}).id
    store.add("t2v", WAN22, dependant_on=first)
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: gpu.started == [first])
    await asyncio.sleep(0.2)
    assert gpu.prefetched == []
    gpu.go.set()
    await until(lambda: statuses(store) == {"Complete": 2})

    gpu2 = PrefetchingGpu()
    dispatcher2 = make_dispatcher(store, tmp_path, gpu2, {"T2V": 2})
    third = store.add("t2v", {"prompt": "y"}).id
    store.add("t2v", {"prompt": "z"}, dependant_on=third)  # the same model: its replica already holds it
    dispatcher2.start()
    running.append(dispatcher2)
    await until(lambda: gpu2.started == [third])
    await asyncio.sleep(0.2)
    assert gpu2.prefetched == []
    assert dispatcher2.status().prefetch["started"] == 0


@in_loop
async def test_one_prefetch_at_a_time_and_never_over_a_model_a_queued_task_needs(store, tmp_path, running):
    gpu = PrefetchingGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 3})
    first = store.add("t2v", {"prompt": "x"}).id
    store.add("t2v", WAN22, dependant_on=first)
    store.add("i2v", {"prompt": "x", "image_start": "start.png"}, dependant_on=first)
    store.add("flf2v", {"prompt": "x", "image_start": "s.png", "image_end": "e.png"}, dependant_on=first)
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: len(gpu.prefetched) == 1)
    await asyncio.sleep(0.2)  # one in flight per deployment, though two replicas are free
    assert gpu.prefetched == [("T2V", "tiny-t2v-22")]
    gpu.loaded.set()
    # The next waiting task's model (oldest first) fits the third replica; a fourth model would evict one
    # that the running task or a prefetched queued task needs.
    await until(lambda: len(gpu.prefetched) == 2)
    await asyncio.sleep(0.2)
    assert gpu.prefetched == [("T2V", "tiny-t2v-22"), ("T2V", "tiny-i2v")]
    assert dispatcher.status().prefetch["started"] == 2
    gpu.go.set()
    await until(lambda: statuses(store).get("Queued", 0) == 0 and not dispatcher.in_flight, timeout_s=5)


class RefusingGpu(PrefetchingGpu):
    """A deployment whose replicas cannot prefetch (a multi-GPU one has no `prefetch`)."""

    async def prefetch(self, deployment: str, model_id: str) -> dict[str, Any]:
        self.prefetched.append((deployment, model_id))
        raise RuntimeError("no method prefetch")


@in_loop
async def test_a_failed_prefetch_pauses_its_deployment_and_the_tasks_still_run(store, tmp_path, running):
    gpu = RefusingGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 3})
    first = store.add("t2v", {"prompt": "x"}).id
    store.add("t2v", WAN22, dependant_on=first)
    store.add("i2v", {"prompt": "x", "image_start": "start.png"}, dependant_on=first)
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: dispatcher.status().prefetch["failed"] == 1)
    await asyncio.sleep(0.2)  # the second waiting task is not tried on the deployment that just failed
    assert gpu.prefetched == [("T2V", "tiny-t2v-22")]
    gpu.go.set()
    await until(lambda: statuses(store).get("Complete", 0) == 2 and not dispatcher.in_flight)


@in_loop
async def test_no_prefetch_while_an_orchestration_runs_its_steps_on_the_replicas(store, tmp_path, running):
    gpu = PrefetchingGpu()
    gpu.loaded.set()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 2})
    first = store.add("t2v", {"prompt": "x"}).id
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: gpu.started == [first])
    # A travel orchestration in flight: its segments use T2V replicas the dispatcher's counts do not see.
    travel = store.add("travel_orchestrator", {"orchestrator_details": {}})
    dispatcher.in_flight[travel.id] = Job(dispatcher, travel, DAG_POOL)
    store.add("t2v", WAN22, dependant_on=first)
    await asyncio.sleep(0.3)
    assert gpu.prefetched == []
    del dispatcher.in_flight[travel.id]  # the orchestration ended
    await until(lambda: gpu.prefetched == [("T2V", "tiny-t2v-22")])
    store.cancel(travel.id)
    gpu.go.set()
    await until(lambda: statuses(store).get("Complete", 0) == 2 and not dispatcher.in_flight)
