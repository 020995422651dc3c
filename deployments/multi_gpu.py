"""A multi-GPU replica: one generation split across the GPUs of a placement group.

The replica reserves a bundle per GPU (Serve's ``placement_group_bundles``, see :func:`multi_gpu_options`; or,
built without them, a placement group of its own), starts one :class:`RankWorker` actor per bundle, and the
workers join one ``torch.distributed`` group (NCCL on GPUs, gloo on CPU) and run their rank of the generation
through :class:`Wan2GP.parallel.ParallelEngine` (CFG parallel, Ulysses sequence parallel, or both).

``generate`` speaks the stream protocol of :mod:`deployments.generation` (``loaded`` / ``progress`` / ``done`` /
``error`` events) and returns the same ``Artifact`` a single-GPU replica would, so the ingress can route a task
to either. NVLink multicast stays off in every worker (:data:`Wan2GP.parallel.NCCL_SAFE_ENV`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any, get_args

import ray
from pydantic import ValidationError
from ray import serve
from ray.util.placement_group import get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import GpuView
from deployments.errors import describe_validation_error
from deployments.lora_fetch import object_bytes, replica_lora_dir, store_lora_files
from Wan2GP.errors import Cancelled, EngineError
from Wan2GP.parallel_plan import MODES, NCCL_SAFE_ENV, plan_degrees

logger = logging.getLogger("ray.serve")

# A rank that failed on its own leaves the others waiting in a collective; give them this long to finish
# (they fail too when the failure was the params') before declaring the replica broken.
STRAGGLER_GRACE_S = 30.0
# A cancel stops every rank at its next denoising step end (a 14B step at 720p takes ~25 s on an H200); ranks
# still running this long after it are stuck, and the replica is declared broken for Serve to replace.
CANCEL_STOP_S = 300.0


# What a rank worker sees (config ``gpu_view``). Ray starts a GPU actor with CUDA_VISIBLE_DEVICES naming its
# own GPU alone; NCCL's peer-to-peer transport (NVLink) needs the peer GPU visible, and without it falls back
# to host shared memory (NVIDIA/nccl#129; ray-project/ray#16979 logs "Could not enable P2P ... via direct
# shared memory"; ray-project/ray#61073 and NVIDIA/nccl#1749: slow NCCL in Ray actors with remapped
# CUDA_VISIBLE_DEVICES). The split decode hands its neighbour 3.8 GB of caches per video at 832x480
# (docs/performance.md), so by default each worker widens its view, before CUDA starts in it, to every GPU of
# its replica and keeps its own as its device, as Ray Train and vLLM do for their workers.
def check_gpu_view(view: str) -> str:
    if view not in get_args(GpuView):
        raise ValueError(f"gpu_view: expected 'replica' or 'own', got {view!r}")
    return view


def replica_gpu_index(own: list[str], replica_gpus: list[str]) -> int:
    """This rank's device index once it sees ``replica_gpus`` (the ids Ray assigned the ranks, in rank order):
    where its own GPU (``own``, the one id Ray assigned it) stands among them."""
    if len(own) != 1:
        raise RuntimeError(f"a rank worker holds one GPU, Ray assigned it {own!r}")
    if own[0] not in replica_gpus:
        raise RuntimeError(f"this rank's GPU {own[0]} is not among its replica's GPUs {replica_gpus!r}")
    return replica_gpus.index(own[0])


def rank_bundles(world_size: int, cpus_per_rank: float = 1.0, replica_cpus: float = 0.1) -> list[dict]:
    """One bundle per rank with one GPU each; bundle 0 also holds the replica actor's CPU share."""
    bundles = [{"CPU": cpus_per_rank, "GPU": 1.0} for _ in range(world_size)]
    bundles[0]["CPU"] = cpus_per_rank + replica_cpus
    return bundles


def multi_gpu_options(
    world_size: int, cpus_per_rank: float = 1.0, replica_cpus: float = 0.1, **extra: Any
) -> dict[str, Any]:
    """``Deployment.options(...)`` for a multi-GPU replica: a STRICT_PACK placement group per replica
    (all its GPUs on one node, where NVLink is), the replica itself in bundle 0 using no GPU."""
    return {
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": 0},
        "placement_group_bundles": rank_bundles(world_size, cpus_per_rank, replica_cpus),
        "placement_group_strategy": "STRICT_PACK",
        "max_ongoing_requests": 1,
        **extra,
    }


@ray.remote(max_concurrency=4)  # threaded: progress polls and cancel run while generate does
class RankWorker:
    """One rank: a process on one GPU (bundle) holding an engine, its rank of the process group."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        default_models: dict[str, str],
        models_dir: str | None = None,
        tiny_dir: str | None = None,
        device: str | None = None,
    ):
        self.rank, self.world_size = rank, world_size
        self.default_models = default_models
        self.models_dir, self.tiny_dir = models_dir, tiny_dir
        self.device = device
        self.parallel = None
        self._cancel = threading.Event()
        self._progress: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        # One generation at a time on a rank: a second one arriving while the first still runs (its request
        # was cancelled during the split encode, which does not stop at a step) would interleave the two
        # generations' collectives differently on each rank and deadlock them. It waits here instead.
        self._generation = threading.Lock()

    def rendezvous(self) -> tuple[str, int]:
        """This worker's node address and a free port on it, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def gpu_ids(self) -> list[str]:
        """The GPU ids Ray assigned this worker (asked before CUDA starts here)."""
        return [str(gpu) for gpu in ray.get_gpu_ids()]

    def setup(
        self,
        master_addr: str,
        master_port: int,
        mode: str,
        options: dict[str, bool] | None = None,
        replica_gpus: list[str] | None = None,
    ) -> dict[str, Any]:
        """Join the process group and build the engine (a collective: every rank at once). ``options``: the
        switches of :class:`~Wan2GP.parallel.ParallelEngine` (share_prompt, split_conditioning, split_decode,
        split_encode). ``replica_gpus``: the ids of every rank's GPU, for this process to see them all (the
        first thing done here: CUDA reads CUDA_VISIBLE_DEVICES when it starts)."""
        own, own_index = self.gpu_ids(), None
        if replica_gpus:
            own_index = replica_gpu_index(own, replica_gpus)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(replica_gpus)
        import torch

        from Wan2GP.catalog import Catalog
        from Wan2GP.engine import Engine
        from Wan2GP.loras import default_lora_dirs
        from Wan2GP.parallel import ParallelEngine, init_distributed

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and own_index is not None:
            if torch.cuda.device_count() == len(replica_gpus):
                device = f"cuda:{own_index}"
            else:  # CUDA started in this process before the view was widened: it sees this rank's GPU alone
                os.environ["CUDA_VISIBLE_DEVICES"] = own[0]
                logger.warning("rank %d: sees its own GPU only (CUDA started before setup)", self.rank)
        resolved = init_distributed(self.rank, self.world_size, master_addr, master_port, device=device)
        # LoRAs fetched by URL arrive as bytes (ranks share no filesystem) and are kept here.
        self.lora_dir = replica_lora_dir()
        engine = Engine(
            device=str(resolved),
            catalog=Catalog.load(self.models_dir, tiny_dir=self.tiny_dir),
            default_models=self.default_models,
            lora_dirs=[*default_lora_dirs(), self.lora_dir],
        )
        self.parallel = ParallelEngine(engine, mode=mode, **(options or {}))
        env = {name: os.environ.get(name) for name in [*NCCL_SAFE_ENV, "CUDA_VISIBLE_DEVICES"]}
        return {"rank": self.rank, "device": str(resolved), "pid": os.getpid(), "env": env}

    def load(self, model_id: str) -> dict[str, Any]:
        """Make ``model_id`` resident and parallel (a collective)."""
        start = time.perf_counter()
        self.parallel.prepare(model_id)
        return {"model": model_id, "seconds": time.perf_counter() - start}

    def generate(
        self,
        task_type: str,
        params: dict[str, Any],
        task_id: str | None,
        lora_files: dict[str, Any] | None = None,
        encode: bool = True,
    ) -> dict[str, Any]:
        """This rank's part of one generation; the event ``generate`` streams (the artifact, or with
        ``encode`` false the frames, on rank 0 only)."""
        if not self._generation.acquire(timeout=CANCEL_STOP_S):  # the last one is stuck: the replica too
            message = f"rank {self.rank}: the previous generation still ran after {CANCEL_STOP_S:.0f}s"
            return {"event": "error", "kind": "engine", "message": message}
        try:
            return self._generate(task_type, params, task_id, lora_files, encode)
        finally:
            self._generation.release()

    def _generate(
        self,
        task_type: str,
        params: dict[str, Any],
        task_id: str | None,
        lora_files: dict[str, Any] | None,
        encode: bool,
    ) -> dict[str, Any]:
        if lora_files:  # object refs, pulled only when this rank lacks the file
            store_lora_files(self.lora_dir, lora_files, read=object_bytes)
        self._cancel.clear()
        with self._lock:
            self._progress.clear()

        def progress(step: int, total: int) -> None:
            with self._lock:
                self._progress.append((step, total))

        try:
            run = self.parallel.generate if encode else self.parallel.render
            output = run(
                task_type,
                params,
                task_id=task_id,
                progress=progress if self.rank == 0 else None,
                should_cancel=self._cancel.is_set,
            )
            return {"event": "done", "artifact" if encode else "rendered": output if self.rank == 0 else None}
        except ValidationError as error:
            return {"event": "error", "kind": "invalid", "message": describe_validation_error(error)}
        except Cancelled as error:
            return {"event": "error", "kind": "cancelled", "message": str(error) or "cancelled"}
        except (EngineError, ValueError, FileNotFoundError) as error:
            return {"event": "error", "kind": "invalid", "message": str(error)}
        except Exception as error:  # out of memory, a broken device, a bug: reported as an engine failure
            logger.exception("rank %d: task %s failed", self.rank, task_id)
            return {
                "event": "error",
                "kind": "engine",
                "message": f"rank {self.rank}: {type(error).__name__}: {error}",
            }

    def last_latents(self):
        """The final latents of this rank's last generation (numpy float32), for equivalence checks."""
        latents = self.parallel.last_latents
        return None if latents is None else latents.numpy()

    def drain_progress(self) -> list[tuple[int, int]]:
        with self._lock:
            events, self._progress = self._progress, []
        return events

    def cancel(self) -> None:
        self._cancel.set()

    def ping(self) -> int:
        return self.rank


@serve.deployment(max_ongoing_requests=1, health_check_period_s=10)
class MultiGpuGenerationDeployment:
    """A family deployment whose every replica spans ``world_size`` GPUs (one video split across them).

    Args:
        family: deployment name, for logs and stats ("T2V").
        default_models: family or task type -> model id, as for :class:`GenerationDeployment`.
        world_size: GPUs (ranks) per replica.
        mode: "cfg", "ulysses" or "cfg+ulysses" (see :mod:`Wan2GP.parallel`).
        device: "cuda" or "cpu" for every rank; default cuda when the workers see one.
        cpus_per_rank: the CPU share of each worker (must fit its bundle).
        preload: a model id to load at start.
        parallel_options: switches of :class:`~Wan2GP.parallel.ParallelEngine` (``share_prompt``,
            ``split_conditioning``, ``split_decode``, ``split_encode``; all on by default).
        gpu_view: "replica" (each rank worker sees all of the replica's GPUs) or "own" (its own alone).
    """

    def __init__(
        self,
        family: str,
        default_models: dict[str, str],
        world_size: int = 2,
        mode: str = "cfg",
        device: str | None = None,
        models_dir: str | None = None,
        tiny_dir: str | None = None,
        cpus_per_rank: float = 1.0,
        preload: str | None = None,
        parallel_options: dict[str, bool] | None = None,
        gpu_view: GpuView = "replica",
    ):
        plan_degrees(mode, world_size)  # a bad mode / size fails here, with the reason
        self.gpu_view = check_gpu_view(gpu_view)
        self.family, self.mode, self.world_size = family, mode, world_size
        self.broken: str | None = None
        self.generations = 0
        self.loaded_model: str | None = None
        self.busy = False
        self.last_task_s: float | None = None

        group = get_current_placement_group()
        self.own_group = None
        if group is None or group.bundle_count < world_size:
            # Built without Serve's placement_group_bundles: reserve the GPUs ourselves.
            self.own_group = placement_group(
                rank_bundles(world_size, cpus_per_rank, 0.0), strategy="STRICT_PACK"
            )
            ray.get(self.own_group.ready(), timeout=300)
            group = self.own_group
        gpus_per_rank = 1 if group.bundle_specs[0].get("GPU", 0) >= 1 else 0
        self.workers = [
            RankWorker.options(
                num_cpus=cpus_per_rank,
                num_gpus=gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank
                ),
                runtime_env={"env_vars": dict(NCCL_SAFE_ENV)},
            ).remote(rank, world_size, default_models, models_dir, tiny_dir, device)
            for rank in range(world_size)
        ]
        address, port = ray.get(self.workers[0].rendezvous.remote())
        replica_gpus = None
        if gpus_per_rank and gpu_view == "replica":
            replica_gpus = [gpu for ids in ray.get([w.gpu_ids.remote() for w in self.workers]) for gpu in ids]
        self.ranks = ray.get(
            [w.setup.remote(address, port, mode, parallel_options, replica_gpus) for w in self.workers]
        )
        logger.info("%s: %d ranks (%s) ready: %s", family, world_size, mode, self.ranks)
        if preload:
            ray.get([w.load.remote(preload) for w in self.workers])
            self.loaded_model = preload

    async def generate(
        self,
        task_type: str,
        params: dict[str, Any],
        task_id: str | None = None,
        lora_files: dict[str, Any] | None = None,
        encode: bool = True,
    ):
        """Run one task on all ranks; an async generator of the events of :mod:`deployments.generation`
        (``lora_files`` as there: the LoRAs fetched by URL, by content name). The ranks encode the MP4 in
        pieces (a task's latency); with ``encode`` false they hand back the frames instead (``rendered``), for
        a caller that uses them and encodes the file itself (a chained travel's segment)."""
        if self.broken is not None:
            yield {"event": "error", "kind": "engine", "message": f"replica is broken: {self.broken}"}
            return
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            try:
                loads = await asyncio.gather(*[w.load.remote(model_id) for w in self.workers])
            except Exception as error:
                yield {
                    "event": "error",
                    "kind": "invalid",
                    "message": f"cannot load model {model_id!r}: {error}",
                }
                return
            self.loaded_model = model_id
            yield {"event": "loaded", "model": model_id, "seconds": max(r["seconds"] for r in loads)}

        started = time.perf_counter()
        self.busy = True
        tasks = [
            asyncio.ensure_future(w.generate.remote(task_type, params, task_id, lora_files, encode))
            for w in self.workers
        ]
        try:
            while not tasks[0].done():
                await asyncio.wait([tasks[0]], timeout=0.2)
                for step, total in await self.workers[0].drain_progress.remote():
                    yield {"event": "progress", "step": step, "total": total}
            results = await self._finish(tasks)
        except (asyncio.CancelledError, GeneratorExit):
            # Stop every rank at the same step (the cancel check is collective), and keep the replica busy
            # until they have stopped, so the next task finds all ranks free: a second cancel while waiting
            # for that is absorbed, not allowed to free the Serve slot early.
            stopping = asyncio.ensure_future(self._stop_ranks(tasks))
            deadline = time.monotonic() + CANCEL_STOP_S
            while not stopping.done() and time.monotonic() < deadline:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopping), deadline - time.monotonic())
            if not stopping.done():
                self.broken = f"ranks still running {CANCEL_STOP_S:.0f}s after a cancel"
            self.busy = False
            raise
        self.busy = False
        errors = [r for r in results if r["event"] == "error"]
        if errors:
            engine_errors = [e for e in errors if e["kind"] == "engine"]
            yield engine_errors[0] if engine_errors else errors[0]
            return
        self.generations += 1
        self.last_task_s = time.perf_counter() - started
        yield results[0]

    async def _stop_ranks(self, tasks: list[asyncio.Future]) -> None:
        await asyncio.gather(*[w.cancel.remote() for w in self.workers], return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _finish(self, tasks: list[asyncio.Future]) -> list[dict[str, Any]]:
        """Every rank's event. A rank that died, or still runs long after rank 0 failed (stuck in a collective
        its peer never joined), marks the replica broken so that Serve replaces it."""
        rank0_ok = tasks[0].exception() is None and tasks[0].result()["event"] == "done"
        done, pending = await asyncio.wait(tasks, timeout=None if rank0_ok else STRAGGLER_GRACE_S)
        results = []
        for rank, task in enumerate(tasks):
            if task in pending:
                task.cancel()
                self.broken = f"rank {rank} still running {STRAGGLER_GRACE_S:.0f}s after rank 0 failed"
                results.append({"event": "error", "kind": "engine", "message": self.broken})
            elif task.exception() is not None:
                self.broken = f"rank {rank} died: {task.exception()}"
                results.append({"event": "error", "kind": "engine", "message": self.broken})
            else:
                results.append(task.result())
        return results

    def stats(self) -> dict[str, Any]:
        """What a router needs to choose between this replica and 1-GPU ones: GPUs it spans (``world_size``),
        whether a task runs now (``busy``), the last task's seconds (``last_task_s``) and the loaded model."""
        return {
            "family": self.family,
            "mode": self.mode,
            "world_size": self.world_size,
            "gpu_view": self.gpu_view,
            "ranks": self.ranks,
            "loaded_model": self.loaded_model,
            "generations": self.generations,
            "busy": self.busy,
            "last_task_s": self.last_task_s,
        }

    async def last_latents(self):
        """Rank 0's final latents of the last generation (numpy float32): for equivalence checks."""
        return await self.workers[0].last_latents.remote()

    async def check_health(self) -> None:
        """Serve restarts a replica one of whose ranks died or hung (its process group is unusable)."""
        if self.broken is not None:
            raise RuntimeError(f"{self.family}: {self.broken}")
        await asyncio.wait_for(asyncio.gather(*[w.ping.remote() for w in self.workers]), timeout=30)


__all__ = ["MODES", "MultiGpuGenerationDeployment", "RankWorker", "multi_gpu_options", "rank_bundles"]
