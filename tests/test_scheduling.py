"""Scheduling a family between its 1-GPU replicas and its split replicas by queue length.

The policy (`deployments.scheduling.choose_pool`) and the config without Ray; the dispatcher's wiring with a
real SQLite table and plain async runners; then the whole service in a real local Ray cluster with fake
GPUs (2 one-GPU T2V replicas + 1 two-GPU CFG-split replica, tiny models on CPU).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_dispatcher import FakeGpu, in_loop, make_dispatcher, until

from db.models import TaskStatus
from db.store import TaskStore, open_store
from deployments.config import AppConfig, DeploymentConfig, split_deployment_name
from deployments.dispatcher import Dispatcher, Job, RunCancelled, RunResult
from deployments.scheduling import (
    REPLICAS,
    SPLIT,
    FamilyScheduler,
    Pool,
    choose_pool,
    phase_guidance,
    task_uses_cfg,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as opened:
        yield opened


@pytest.fixture
def running() -> list[Dispatcher]:
    """Dispatchers a test started: `in_loop` stops them before its event loop closes."""
    return []


ONE_GPU = Pool("T2V", gpus_per_replica=1, replicas=2, capacity=2)
SPLIT_POOL = Pool("T2V-split", gpus_per_replica=2, replicas=1, capacity=1, parallel_mode="cfg")
ULYSSES_POOL = Pool("T2V-split", gpus_per_replica=2, replicas=1, capacity=1, parallel_mode="ulysses")

# ---- the policy ----------------------------------------------------------------------------------------


def test_one_waiting_task_runs_split_for_latency() -> None:
    decision = choose_pool(1, ONE_GPU, 0, SPLIT_POOL, 0)
    assert decision is not None
    assert (decision.role, decision.deployment) == (SPLIT, "T2V-split")
    assert decision.reason.startswith("latency: 1 task(s) waiting") and "2 GPUs" in decision.reason
    assert decision.free == {REPLICAS: 2, SPLIT: 1}


def test_a_longer_queue_goes_to_the_one_gpu_replicas_then_overflows_to_split() -> None:
    decision = choose_pool(4, ONE_GPU, 0, SPLIT_POOL, 0)
    assert decision is not None and decision.role == REPLICAS
    assert (
        decision.reason
        == "throughput: 4 task(s) waiting, more than 1 free split slot(s); 2 of 2 1-GPU slot(s) free"
    )
    # One 1-GPU replica busy, three waiting: still the 1-GPU replica.
    assert choose_pool(3, ONE_GPU, 1, SPLIT_POOL, 0).role == REPLICAS  # type: ignore[union-attr]
    # Both 1-GPU replicas busy: the split replica takes the task rather than idle.
    overflow = choose_pool(2, ONE_GPU, 2, SPLIT_POOL, 0)
    assert overflow is not None and overflow.role == SPLIT
    assert "every 1-GPU slot busy" in overflow.reason
    # The split replica busy and one task waiting: a free 1-GPU replica runs it now.
    now = choose_pool(1, ONE_GPU, 0, SPLIT_POOL, 1)
    assert now is not None and now.role == REPLICAS and "split replica(s) busy" in now.reason
    # Nothing free: no decision, the task waits.
    assert choose_pool(1, ONE_GPU, 2, SPLIT_POOL, 1) is None


def test_as_many_waiting_as_split_replicas_all_run_split() -> None:
    two_split = Pool("T2V-split", gpus_per_replica=2, replicas=2, capacity=2)
    assert choose_pool(2, ONE_GPU, 0, two_split, 0).role == SPLIT  # type: ignore[union-attr]
    assert choose_pool(3, ONE_GPU, 0, two_split, 0).role == REPLICAS  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="waiting: at least the task being placed"):
        choose_pool(0, ONE_GPU, 0, two_split, 0)


def test_the_family_scheduler_remembers_its_last_decision_for_the_status_view() -> None:
    scheduler = FamilyScheduler("T2V", ONE_GPU, SPLIT_POOL)
    assert scheduler.capacity == 3
    assert scheduler.view({}, 0)["last_decision"] is None
    scheduler.decide(1, {}, task_id="a")
    scheduler.decide(3, {SPLIT: 1}, task_id="b")
    assert scheduler.decide(1, {SPLIT: 1, REPLICAS: 2}, task_id="c") is None  # not recorded
    view = scheduler.view({SPLIT: 1, REPLICAS: 1}, queued=1)
    assert view["pools"][SPLIT] == {
        "deployment": "T2V-split",
        "gpus_per_replica": 2,
        "parallel_mode": "cfg",
        "replicas": 1,
        "capacity": 1,
        "busy": 1,
        "steps": 0,
        "idle": 0,
        "decided": 1,
    }
    assert view["pools"][REPLICAS]["busy"] == 1 and view["pools"][REPLICAS]["idle"] == 1
    assert view["queued"] == 1
    last = view["last_decision"]
    assert (last["task_id"], last["pool"], last["waiting"]) == ("b", REPLICAS, 3)
    assert last["reason"].startswith("throughput")


def test_a_task_without_cfg_prefers_a_one_gpu_replica_over_a_cfg_split() -> None:
    # Alone in the queue (a CFG task would run split), it takes a 1-GPU replica: the split gains nothing.
    decision = choose_pool(1, ONE_GPU, 0, SPLIT_POOL, 0, cfg=False)
    assert decision is not None and decision.role == REPLICAS
    assert decision.reason == (
        "no CFG: a cfg split would waste one GPU (both ranks compute the same prediction); "
        "2 of 2 1-GPU slot(s) free"
    )
    # Every 1-GPU slot busy: the split replica runs it rather than leave it waiting.
    overflow = choose_pool(1, ONE_GPU, 2, SPLIT_POOL, 0, cfg=False)
    assert overflow is not None and overflow.role == SPLIT
    assert overflow.reason.startswith("no CFG, every 1-GPU slot busy: the cfg split replica runs it")
    assert choose_pool(1, ONE_GPU, 2, SPLIT_POOL, 1, cfg=False) is None
    # A Ulysses split divides the sequence: it gains on any task, so the queue-length policy holds.
    ulysses = choose_pool(1, ONE_GPU, 0, ULYSSES_POOL, 0, cfg=False)
    assert ulysses is not None and ulysses.role == SPLIT and ulysses.reason.startswith("latency")


@pytest.fixture(scope="module")
def routing(tmp_path_factory: pytest.TempPathFactory):
    from test_dispatcher import CATALOG, MODELS

    from deployments.routing import Routing
    from storage import InputFetcher, OutputStorage, StorageConfig

    root = tmp_path_factory.mktemp("routing")
    storage = OutputStorage(StorageConfig(root=str(root)))
    return Routing(CATALOG, MODELS, InputFetcher([str(root)], outputs=storage), ["T2V", "VACE"])


@pytest.mark.parametrize(
    ("task_type", "params", "guidance", "cfg"),
    [
        ("t2v", {"prompt": "a"}, [5.0], True),  # the tiny model's default
        ("t2v", {"prompt": "a", "guidance_scale": 1}, [1.0], False),
        ("t2v", {"prompt": "a", "use_lighti2x_lora": True}, [1.0], False),  # the preset's guidance
        ("t2v", {"prompt": "a", "use_causvid_lora": True, "guidance_scale": 4}, [4.0], True),  # given wins
        ("t2v", {"prompt": "a", "guidance_phases": 2, "guidance_scale": 1, "guidance2_scale": 3}, [1.0, 3.0], True),
        (
            "t2v",
            {"prompt": "a", "phase_config": {
                "num_phases": 2, "steps_per_phase": [2, 2], "flow_shift": 5, "sample_solver": "euler",
                "phases": [{"guidance_scale": 1}, {"guidance_scale": 1}],
            }},
            [1.0, 1.0],
            False,
        ),
        ("vace", {"video_guide": "guide", "guidance_scale": 1}, [1.0], False),  # a travel step's stand-in
    ],
)  # fmt: skip
def test_guidance_of_a_task_says_whether_it_runs_cfg(routing, task_type, params, guidance, cfg) -> None:
    parsed, definition = routing.parse(task_type, params)
    assert phase_guidance(definition, parsed) == guidance
    assert task_uses_cfg(routing, task_type, params) is cfg


def test_unparseable_params_count_as_cfg(routing) -> None:
    assert task_uses_cfg(routing, "t2v", {"prompt": "a", "guidance_scale": "lots"}) is True


# ---- orchestration steps: tickets and leases (no Ray) ---------------------------------------------------


def test_a_chain_asks_one_step_at_a_time_and_runs_each_split() -> None:
    scheduler = FamilyScheduler("VACE", ONE_GPU, SPLIT_POOL)
    for index in range(3):
        ticket = scheduler.ticket(f"seg{index}")
        assert scheduler.steps_waiting == 1
        decision = ticket.lease(0, {})
        assert decision is not None and decision.role == SPLIT and decision.task_id == f"seg{index}"
        assert decision.reason.startswith("latency: 1 task(s) waiting")
        assert scheduler.steps_waiting == 0 and scheduler.busy({}) == {REPLICAS: 0, SPLIT: 1}
        assert ticket.lease(0, {}) is decision  # leasing again keeps the slot it has
        ticket.release()
        ticket.release()  # idempotent
        assert scheduler.busy({}) == {REPLICAS: 0, SPLIT: 0}
    with pytest.raises(RuntimeError, match="seg2: its ticket was released"):
        ticket.lease(0, {})


def test_independent_steps_ask_at_once_and_spread_like_a_burst() -> None:
    scheduler = FamilyScheduler("VACE", ONE_GPU, SPLIT_POOL)
    tickets = [scheduler.ticket(f"seg{i}") for i in range(4)]
    assert scheduler.view({}, 0)["steps_waiting"] == 4
    roles = [ticket.lease(0, {}) for ticket in tickets]
    # Four waiting for three slots: the 1-GPU replicas first (throughput), the split replica takes the
    # third rather than idle, the fourth waits.
    assert [d.role if d else None for d in roles] == [REPLICAS, REPLICAS, SPLIT, None]
    assert roles[0].reason.startswith("throughput: 4 task(s) waiting")  # type: ignore[union-attr]
    view = scheduler.view({}, 0)
    assert view["pools"][SPLIT]["steps"] == 1 and view["pools"][REPLICAS]["busy"] == 2
    assert view["pools"][REPLICAS]["idle"] == 0 and view["steps_waiting"] == 1
    tickets[0].release()
    last = tickets[3].lease(0, {})
    assert last is not None and last.role == REPLICAS
    tickets[1].release(), tickets[2].release(), tickets[3].release()
    # A ticket given up before it leased (a sibling failed) stops counting as waiting.
    withdrawn = scheduler.ticket("seg9")
    withdrawn.release()
    assert scheduler.steps_waiting == 0 and scheduler.busy({}) == {REPLICAS: 0, SPLIT: 0}


def test_tasks_and_steps_see_each_others_slots_and_queue() -> None:
    scheduler = FamilyScheduler("T2V", ONE_GPU, SPLIT_POOL)
    step = scheduler.ticket("seg0")
    assert step.lease(0, {}).role == SPLIT  # type: ignore[union-attr]
    # A lone task now: the split slot is the step's, so a 1-GPU replica runs it.
    task = scheduler.decide(1, {})
    assert task is not None and task.role == REPLICAS and "split replica(s) busy" in task.reason
    # A step waiting makes the queue longer for a task: two waiting > one free split slot.
    step.release()
    waiting = scheduler.ticket("seg1")
    task = scheduler.decide(1, {})
    assert task is not None and task.role == REPLICAS and task.reason.startswith("throughput: 2 task(s)")
    # Tasks running fill the pools for a step as well.
    assert waiting.lease(0, {REPLICAS: 2, SPLIT: 1}) is None
    assert scheduler.steps_waiting == 1
    no_cfg = scheduler.ticket("seg2", cfg=False)
    decision = no_cfg.lease(0, {})
    assert decision is not None and decision.role == REPLICAS and decision.reason.startswith("no CFG")


# ---- the config ----------------------------------------------------------------------------------------


def test_split_config_adds_its_capacity_and_a_deployment_name() -> None:
    config = DeploymentConfig.model_validate({"replicas": 2, "split": {"gpus_per_replica": 2}})
    assert config.split is not None and config.split.parallel_mode == "cfg"
    assert config.split.gpu_view == "replica"  # every rank sees the replica's GPUs: NCCL's peer paths
    assert (config.replica_capacity, config.split_capacity, config.capacity) == (2, 1, 3)
    assert split_deployment_name("T2V") == "T2V-split"
    assert DeploymentConfig().capacity == 1  # no split: as before


@pytest.mark.parametrize(
    ("t2v", "expected"),
    [
        (
            {"split": {"gpus_per_replica": 4, "parallel_mode": "cfg"}},
            r"deployments\.T2V\.split\n.*split\.parallel_mode 'cfg' with split\.gpus_per_replica 4: "
            r"mode 'cfg' needs exactly 2 ranks",
        ),
        (
            {"split": {"gpus_per_replica": 1}},
            r"deployments\.T2V\.split\.gpus_per_replica\n.*greater than or equal to 2",
        ),
        ({"split": {"gpu": 2}}, r"deployments\.T2V\.split\.gpu\n.*Extra inputs are not permitted"),
        ({"split": {"parallel_mode": "ring"}}, r"deployments\.T2V\.split\.parallel_mode\n"),
        (
            {"gpus_per_replica": 2, "split": {}},
            r"deployments\.T2V\n.*split: goes beside 1-GPU replicas, but gpus_per_replica is 2",
        ),
        (
            {"gpus_per_replica": 3, "parallel_mode": "cfg"},
            r"deployments\.T2V\n.*parallel_mode 'cfg' with gpus_per_replica 3",
        ),
        # What shapes multi-GPU replicas, given to 1-GPU ones, is refused rather than ignored.
        (
            {"parallel_mode": "ulysses"},
            r"deployments\.T2V\n.*parallel_mode: applies to replicas spanning several GPUs, but "
            r"gpus_per_replica is 1",
        ),
        ({"gpu_view": "own"}, r"deployments\.T2V\n.*gpu_view: applies to replicas spanning several GPUs"),
        ({"gpus_per_replica": 2, "gpu_view": "node"}, r"deployments\.T2V\.gpu_view\n.*'replica' or 'own'"),
        ({"split": {"gpu_view": "all"}}, r"deployments\.T2V\.split\.gpu_view\n.*'replica' or 'own'"),
        # What 1-GPU replicas take and a multi-GPU one would not honour.
        (
            {"gpus_per_replica": 2, "memory_profile": "model_offload"},
            r"deployments\.T2V\n.*memory_profile: a multi-GPU replica keeps its model resident on every rank",
        ),
        (
            {"gpus_per_replica": 2, "vae_tiling": True},
            r"deployments\.T2V\n.*vae_tiling: a multi-GPU replica splits the VAE decode across its ranks",
        ),
        (
            {"gpus_per_replica": 2, "max_ongoing_requests": 2},
            r"deployments\.T2V\n.*max_ongoing_requests: a multi-GPU replica runs one generation at a time.*got 2",
        ),
        (
            {"gpus_per_replica": 2, "num_gpus": 1},
            r"deployments\.T2V\n.*num_gpus: a multi-GPU replica takes one whole GPU per rank",
        ),
    ],
)
def test_bad_split_configs_are_refused_at_load_naming_the_field(t2v: dict, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        AppConfig.model_validate({"deployments": {"T2V": t2v}})


def test_what_the_cluster_cannot_place_is_named_at_build() -> None:
    from deployments.app import gpu_shortfalls

    split = AppConfig.model_validate(
        {"deployments": {"T2V": {"num_gpus": 1, "replicas": 2, "split": {"gpus_per_replica": 2}}}}
    )
    assert gpu_shortfalls(split, [2.0, 2.0]) == []  # 2 + 2 GPUs, the split's two on one node
    assert gpu_shortfalls(split, [1.0, 1.0, 1.0, 1.0]) == [
        "deployments.T2V.split.gpus_per_replica: a replica needs 2 GPU(s) on one node, the largest node has 1: "
        "it waits until such a node joins"
    ]
    assert gpu_shortfalls(split, [2.0]) == [
        "deployments: their replicas need 4 GPU(s) in all, the cluster has 2: some wait until GPUs free up or "
        "nodes join"
    ]
    one_gpu = AppConfig.model_validate({"deployments": {"VACE": {"num_gpus": 1}, "Flux": {"num_gpus": 0.5}}})
    assert gpu_shortfalls(one_gpu, []) == [
        "deployments.VACE.num_gpus: a replica needs 1 GPU(s) on one node, the largest node has 0: it waits "
        "until such a node joins",
        "deployments.Flux.num_gpus: a replica needs 0.5 GPU(s) on one node, the largest node has 0: it waits "
        "until such a node joins",
    ]
    assert gpu_shortfalls(AppConfig(), []) == []  # the CPU default asks for no GPU
    autoscaled = AppConfig.model_validate(
        {"deployments": {"T2V": {"num_gpus": 1, "autoscaling": {"min_replicas": 0, "max_replicas": 8}}}}
    )
    assert gpu_shortfalls(autoscaled, [1.0]) == []  # what it starts with fits; more comes with load


def test_image_families_cannot_split() -> None:
    with pytest.raises(ValidationError, match=r"deployments\.Flux\.split: Flux models cannot be split"):
        AppConfig.model_validate({"deployments": {"Flux": {"split": {}}}})
    with pytest.raises(ValidationError, match=r"deployments\.Image\.gpus_per_replica: Image models cannot"):
        AppConfig.model_validate({"deployments": {"Image": {"gpus_per_replica": 2}}})
    config = AppConfig.model_validate({"deployments": {"VACE": {"split": {"parallel_mode": "ulysses"}}}})
    assert config.deployments["VACE"].split is not None


# ---- the dispatcher's wiring (no Ray) ------------------------------------------------------------------


class PoolRecorder(FakeGpu):
    """A FakeGpu that records which pool the scheduler gave each task."""

    def __init__(self) -> None:
        super().__init__()
        self.placed: dict[str, str] = {}

    async def run(self, job: Job) -> RunResult:
        assert job.decision is not None
        self.placed[job.task.id] = job.decision.role
        return await super().run(job)


def scheduled_dispatcher(store: TaskStore, tmp_path: Path, runner: FakeGpu) -> Dispatcher:
    dispatcher = make_dispatcher(store, tmp_path, runner, {"T2V": 3})
    dispatcher.schedulers = {"T2V": FamilyScheduler("T2V", ONE_GPU, SPLIT_POOL)}
    return dispatcher


PARAMS = {"prompt": "a cat", "resolution": "64x48", "video_length": 9}


@in_loop
async def test_one_task_runs_split_and_many_spread_over_the_one_gpu_replicas(store, tmp_path, running):
    gpu = PoolRecorder()
    dispatcher = scheduled_dispatcher(store, tmp_path, gpu)
    single = store.add("t2v", PARAMS)
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: single.id in gpu.placed)
    assert gpu.placed[single.id] == SPLIT
    view = dispatcher.status().scheduling["T2V"]
    assert view["pools"][SPLIT]["busy"] == 1 and view["pools"][REPLICAS]["idle"] == 2
    assert view["last_decision"]["task_id"] == single.id
    assert view["last_decision"]["reason"].startswith("latency: 1 task(s) waiting")
    gpu.go.set()
    await until(lambda: store.get(single.id).status == TaskStatus.COMPLETE)
    result = store.get(single.id).result
    assert result["scheduling"]["deployment"] == "T2V-split" and result["scheduling"]["pool"] == SPLIT

    # Five at once: three slots. The first placed go to the 1-GPU replicas (the queue is long), the
    # split replica takes the third rather than idle; the other two wait for a slot.
    gpu.go.clear()
    many = [store.add("t2v", {**PARAMS, "seed": i}) for i in range(5)]
    dispatcher.wake()
    await until(lambda: sum(task.id in gpu.placed for task in many) == 3)
    await asyncio.sleep(0.2)  # nothing more starts while the three run
    started = [task.id for task in many if task.id in gpu.placed]
    assert len(started) == 3
    assert Counter(gpu.placed[task_id] for task_id in started) == {REPLICAS: 2, SPLIT: 1}
    first = next(task_id for task_id in gpu.started if task_id in started)
    assert gpu.placed[first] == REPLICAS  # the queue was long when the first was placed
    view = dispatcher.status().scheduling["T2V"]
    assert view["pools"][REPLICAS]["busy"] == 2 and view["pools"][SPLIT]["busy"] == 1
    assert view["pools"][REPLICAS]["idle"] == 0 and view["queued"] == 2
    gpu.go.set()
    await until(lambda: all(store.get(task.id).status == TaskStatus.COMPLETE for task in many), 5.0)
    decided = dispatcher.schedulers["T2V"].decided
    assert decided[REPLICAS] >= 2 and decided[SPLIT] >= 2


@in_loop
async def test_an_orchestration_step_leases_a_slot_the_tasks_then_see_busy(store, tmp_path, running):
    """A step's lease (Job.step_ticket / lease_step, as the OrchestrationRunner's `ctx.place` uses them)
    holds the split slot: a task posted meanwhile takes a 1-GPU replica; a step finding every slot busy
    waits, shows in the status view, gets the slot when one is returned, and a dropped job stops
    waiting. A guidance-1 task takes a 1-GPU replica although it is alone."""
    gpu = PoolRecorder()
    dispatcher = scheduled_dispatcher(store, tmp_path, gpu)
    dispatcher.start()
    running.append(dispatcher)
    orchestrator = Job(dispatcher, store.add("travel_orchestrator", {}), "DAG")  # not claimed: no DAG pool
    assert not orchestrator.schedules("Flux")  # no split pool there: its steps go to its replicas
    assert orchestrator.schedules("T2V")
    first = orchestrator.step_ticket("T2V", "seg0")
    decision = await orchestrator.lease_step(first)
    assert decision.role == SPLIT and decision.placement() == {
        "deployment": "T2V-split",
        "pool": SPLIT,
        "reason": decision.reason,
    }
    view = dispatcher.status().scheduling["T2V"]
    assert view["pools"][SPLIT]["busy"] == 1 and view["pools"][SPLIT]["steps"] == 1

    lone = store.add("t2v", PARAMS)
    dispatcher.wake()
    await until(lambda: lone.id in gpu.placed)
    assert gpu.placed[lone.id] == REPLICAS  # the split slot is the step's
    assert store.get(lone.id).status == TaskStatus.IN_PROGRESS
    other = store.add("t2v", {**PARAMS, "seed": 2})
    dispatcher.wake()
    await until(lambda: other.id in gpu.placed)
    assert gpu.placed[other.id] == REPLICAS

    # Every slot busy: the next step waits, and counts as waiting.
    second = orchestrator.step_ticket("T2V", "seg1")
    waiting = asyncio.ensure_future(orchestrator.lease_step(second))
    await asyncio.sleep(0.2)
    assert not waiting.done() and dispatcher.status().scheduling["T2V"]["steps_waiting"] == 1
    first.release()
    assert (await asyncio.wait_for(waiting, 2.0)).role == SPLIT
    gpu.go.set()
    await until(lambda: all(store.get(t.id).status == TaskStatus.COMPLETE for t in (lone, other)))
    assert store.get(lone.id).result["scheduling"]["pool"] == REPLICAS

    # A guidance-1 task alone: a 1-GPU replica, not the (free) split replica, which would waste a GPU.
    second.release()
    no_cfg = store.add("t2v", {**PARAMS, "seed": 3, "guidance_scale": 1})
    dispatcher.wake()
    await until(lambda: store.get(no_cfg.id).status == TaskStatus.COMPLETE)
    scheduling = store.get(no_cfg.id).result["scheduling"]
    assert scheduling["pool"] == REPLICAS and scheduling["reason"].startswith(
        "no CFG: a cfg split would waste one GPU"
    )

    # A step waiting when its job is dropped stops waiting and gives its ticket up.
    gpu.go.clear()
    tickets = [orchestrator.step_ticket("T2V", f"b{i}") for i in range(3)]
    blockers = [await orchestrator.lease_step(ticket) for ticket in tickets]
    assert sorted(d.role for d in blockers) == [REPLICAS, REPLICAS, SPLIT]
    stuck = orchestrator.step_ticket("T2V", "stuck")
    waiting = asyncio.ensure_future(orchestrator.lease_step(stuck))
    await asyncio.sleep(0.1)
    orchestrator.stop()
    with pytest.raises(RunCancelled):
        await asyncio.wait_for(waiting, 2.0)
    assert dispatcher.schedulers["T2V"].steps_waiting == 0


# ---- the whole service: a real local Ray cluster, fake GPUs, tiny models on CPU -------------------------


@pytest.mark.slow
def test_app_sends_one_task_to_the_split_replica_and_many_to_the_one_gpu_replicas(tmp_path: Path) -> None:
    """7 fake GPUs: T2V with 2 one-GPU replicas and 1 two-GPU CFG-split replica, VACE with 1 one-GPU
    replica and 1 CFG-split replica. A chained travel's segments run split, one after the other; a lone
    task runs split, a lone guidance-1 task on a 1-GPU replica; a burst spreads over both 1-GPU replicas.
    The tasks' (and segment rows') results and /replicas say where each ran."""
    from hwgp_testing import running_app, wait_final
    from Wan2GP.video import encode_png

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(3):
        image = np.zeros((48, 64, 3), dtype=np.uint8)
        image[10:30, 10 + 8 * i : 30 + 8 * i] = 255  # a square that moves between anchors
        (inputs / f"anchor{i}.png").write_bytes(encode_png(image))
    family = {"num_gpus": 1, "num_cpus": 0.2, "device": "cpu"}
    split = {"gpus_per_replica": 2, "parallel_mode": "cfg", "num_cpus": 0.2}
    config = {
        "db": f"sqlite:///{tmp_path / 'tasks.db'}",
        "storage": {"root": str(tmp_path / "files")},
        "input_dirs": [str(inputs)],
        "models": "tiny",
        "deployments": {
            "T2V": {**family, "replicas": 2, "split": split},
            "VACE": {**family, "replicas": 1, "split": {**split, "gpu_view": "own"}},
        },
    }
    params = {"prompt": "split or not", "resolution": "64x48", "video_length": 9, "num_inference_steps": 4}
    with running_app(config, num_gpus=7, num_cpus=4) as client:
        # A chained travel (2 segments): each segment asks for a slot when the previous one is done, finds
        # the VACE split replica free and runs on it (latency); the segment rows record it.
        travel = {
            "images": [str(inputs / f"anchor{i}.png") for i in range(3)],
            "prompt": "a square travels", "frames": 9, "overlap": 2, "resolution": "64x48",
            "num_inference_steps": 2, "seed": 3,
        }  # fmt: skip
        created = client.post("/tasks", json={"task_type": "travel_orchestrator", "params": travel})
        assert created.status_code == 201, created.text
        orchestrator = wait_final(client, created.json()["id"])
        assert orchestrator["status"] == "Complete", orchestrator["error_message"]
        with open_store(config["db"]) as store:
            rows = [t for t in store.list(limit=100) if t.task_type == "travel_segment"]
        segments = sorted(rows, key=lambda t: t.params["segment_index"])
        assert [s.status for s in segments] == [TaskStatus.COMPLETE] * 2
        placements = [s.result["scheduling"] for s in segments]
        print(f"chained travel segments placed: {placements}")
        assert [p["deployment"] for p in placements] == ["VACE-split"] * 2
        assert all(p["reason"].startswith("latency: 1 task(s) waiting") for p in placements), placements
        replicas = client.get("/replicas").json()
        assert [r["generations"] for r in replicas["VACE-split"]["replicas"]] == [2]
        assert [r["generations"] for r in replicas["VACE"]["replicas"]] == [0]
        # What each rank worker sees: T2V's split (the default view) both of its replica's GPUs, in the same
        # order on both ranks; VACE's (gpu_view: own) each its own GPU alone, as Ray started it.
        t2v_split, vace_split = replicas["T2V-split"]["replicas"][0], replicas["VACE-split"]["replicas"][0]
        assert (t2v_split["gpu_view"], vace_split["gpu_view"]) == ("replica", "own")
        views = [r["env"]["CUDA_VISIBLE_DEVICES"] for r in t2v_split["ranks"]]
        assert len(set(views)) == 1 and len(views[0].split(",")) == 2, views
        views = [r["env"]["CUDA_VISIBLE_DEVICES"] for r in vace_split["ranks"]]
        assert len(set(views)) == 2 and all("," not in view for view in views), views
        assert replicas["scheduling"]["VACE"]["pools"][SPLIT]["decided"] == 2

        def post(seed: int, steps: int = 4) -> str:
            task = {"task_type": "t2v", "params": {**params, "seed": seed, "num_inference_steps": steps}}
            created = client.post("/tasks", json=task)
            assert created.status_code == 201, created.text
            return created.json()["id"]

        # One task: the split replica (both of its GPUs on it).
        lone = wait_final(client, post(1))
        assert lone["status"] == "Complete", lone["error_message"]
        assert lone["result"]["scheduling"]["deployment"] == "T2V-split"
        assert lone["result"]["scheduling"]["reason"].startswith("latency: 1 task(s) waiting")
        replicas = client.get("/replicas").json()
        split_replicas = replicas["T2V-split"]["replicas"]
        assert [r["generations"] for r in split_replicas] == [1] and split_replicas[0]["world_size"] == 2
        assert [r["generations"] for r in replicas["T2V"]["replicas"]] == [0, 0]
        view = replicas["scheduling"]["T2V"]
        assert view["last_decision"]["task_id"] == lone["id"] and view["last_decision"]["pool"] == SPLIT
        assert view["pools"][SPLIT]["deployment"] == "T2V-split" and view["pools"][SPLIT]["idle"] == 1

        # Alone too, but without CFG (guidance 1): a 1-GPU replica, where the cfg split would waste a GPU.
        created = client.post("/tasks", json={"task_type": "t2v", "params": {**params, "guidance_scale": 1}})
        assert created.status_code == 201, created.text
        no_cfg = wait_final(client, created.json()["id"])
        assert no_cfg["status"] == "Complete", no_cfg["error_message"]
        assert no_cfg["result"]["scheduling"]["deployment"] == "T2V"
        assert no_cfg["result"]["scheduling"]["reason"].startswith("no CFG: a cfg split would waste one GPU")

        # A burst: the queue is longer than the split replica, so the 1-GPU replicas take tasks (the split
        # replica takes what they cannot).
        burst_ids = [post(seed, steps=200) for seed in range(10, 16)]  # seconds each on CPU
        # While they run, /replicas answers (within its 2 s per-replica wait) and shows busy pools.
        busy_seen, started, calls = None, time.monotonic(), []
        while busy_seen is None and time.monotonic() - started < 60:
            asked = time.monotonic()
            replicas = client.get("/replicas").json()
            pools_now = replicas["scheduling"]["T2V"]["pools"]
            calls.append(
                (round(time.monotonic() - asked, 2), pools_now[REPLICAS]["busy"], pools_now[SPLIT]["busy"])
            )
            if pools_now[REPLICAS]["busy"] + pools_now[SPLIT]["busy"] >= 2:
                busy_seen = replicas
        print(
            f"lone task timings {lone['result']['timings']}; /replicas (s, busy 1-GPU, split): {calls[:20]}"
        )
        assert busy_seen is not None, "never saw two pools' slots busy"
        print(f"/replicas while busy: {json.dumps(busy_seen)[:2000]}")
        assert all(seconds < 10 for seconds, _, _ in calls)
        burst = [wait_final(client, task_id) for task_id in burst_ids]
        assert all(task["status"] == "Complete" for task in burst), [t["error_message"] for t in burst]
        pools = Counter(task["result"]["scheduling"]["pool"] for task in burst)
        assert pools[REPLICAS] >= 3, pools
        reasons = [task["result"]["scheduling"]["reason"] for task in burst]
        assert any(reason.startswith("throughput") for reason in reasons), reasons
        replicas = client.get("/replicas").json()
        one_gpu = [r["generations"] for r in replicas["T2V"]["replicas"]]
        print(f"burst of 6: pools {dict(pools)}, 1-GPU replicas ran {one_gpu}")
        assert len(one_gpu) == 2 and min(one_gpu) >= 1 and sum(one_gpu) == 1 + pools[REPLICAS]
        assert replicas["T2V-split"]["replicas"][0]["generations"] == 1 + pools[SPLIT]
        view = replicas["scheduling"]["T2V"]
        assert view["pools"][REPLICAS]["decided"] == 1 + pools[REPLICAS]
        assert view["pools"][SPLIT]["decided"] == 1 + pools[SPLIT]
        assert view["pools"][REPLICAS]["busy"] == 0 and view["queued"] == 0
