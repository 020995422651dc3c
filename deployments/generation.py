"""A family deployment: one warm `Engine` per replica, serving one model family (T2V, VACE, Flux).

Thin by design: it streams progress events and returns the output's frames; it never touches the
database or storage, so a replica can run anywhere and a request can be retried anywhere.

Pipelined (issue 21.5): the replica returns raw uint8 frames (`Rendered`) as soon as the VAE decode ends and
takes its next request; the MP4 / PNG encode runs on a CPU (`deployments.runners.encode_node`, or in the
orchestration's own Ray task: `dag.steps.generate_step`).

Stream protocol of `generate` (one dict per item):
    {"event": "loaded", "model": id, "seconds": s, "reused": bool}   (reused: resident before this request)
    {"event": "progress", "step": i, "total": n}
    {"event": "done", "rendered": Rendered}     (a multi-GPU replica sends {"event": "done", "artifact": Artifact})
    {"event": "error", "kind": "invalid" | "cancelled" | "engine", "message": str}
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve.metrics import Counter, Histogram

from deployments.errors import describe_validation_error
from deployments.lora_fetch import object_bytes, replica_lora_dir, store_lora_files
from Wan2GP.acceleration import AccelerationConfig
from Wan2GP.engine import Engine
from Wan2GP.errors import Cancelled, EngineError

logger = logging.getLogger("ray.serve")


class _LoadedModel:
    """What Serve's multiplexing keeps per model id; its deletion is the eviction we log."""

    def __init__(self, deployment: str, model_id: str):
        self.deployment, self.model_id = deployment, model_id

    def __del__(self) -> None:
        logger.info("%s: evicted model %s from this replica", self.deployment, self.model_id)


@serve.deployment(max_ongoing_requests=1, health_check_period_s=10)
class GenerationDeployment:
    def __init__(
        self,
        family: str,
        default_models: dict[str, str],
        memory_profile: str = "resident",
        device: str | None = None,
        models_dir: str | None = None,
        preload: str | None = None,
        acceleration: dict[str, Any] | None = None,
    ):
        from Wan2GP.catalog import Catalog
        from Wan2GP.loras import default_lora_dirs

        self.family = family
        # LoRAs fetched by URL arrive as bytes (replicas share no filesystem) and are kept here.
        self.lora_dir = replica_lora_dir()
        self.engine = Engine(
            device=device,
            memory_profile=memory_profile,
            catalog=Catalog.load(models_dir),
            default_models=default_models,
            lora_dirs=[*default_lora_dirs(), self.lora_dir],
            acceleration=AccelerationConfig(**acceleration) if acceleration else None,
        )
        self.load_error: str | None = None
        self.generations = 0
        self.prefetches = 0  # models loaded ahead of their task (`prefetch`)
        self.last_prefetch: dict[str, Any] | None = None  # its model and when it started and finished
        # When this replica was busy with each recent task (epoch seconds): its GPU time, which excludes the
        # encode and the save since those run after it handed the frames back.
        self.recent: deque[dict[str, Any]] = deque(maxlen=64)
        self._load_seconds = Histogram(
            "hwgp_model_load_seconds",
            description="Time to make a model resident on a replica.",
            boundaries=[0.1, 1, 5, 15, 30, 60, 120, 300],
            tag_keys=("model",),
        )
        self._generations = Counter(
            "hwgp_replica_generations",
            description="Generations run by a replica.",
            tag_keys=("model",),
        )
        if preload:
            self._load(preload)

    def _load(self, model_id: str) -> dict[str, Any]:
        try:
            report = self.engine.load(model_id)
        except EngineError:
            raise  # a bad model id or missing weights: the task fails, the replica stays healthy
        except Exception as error:  # corrupt weights, a broken device: let check_health report it
            self.load_error = f"{type(error).__name__}: {error}"
            raise
        self.load_error = None
        if not report.reused:
            self._load_seconds.observe(report.seconds, tags={"model": model_id})
            logger.info(
                "%s: loaded %s in %.2f s (%s)",
                self.family,
                model_id,
                report.seconds,
                report.components_loaded,
            )
        return {"model": model_id, "seconds": report.seconds, "reused": report.reused}

    @serve.multiplexed(max_num_models_per_replica=1)
    async def _model(self, model_id: str) -> _LoadedModel:
        await asyncio.to_thread(self._load, model_id)
        return _LoadedModel(self.family, model_id)

    async def generate(
        self,
        task_type: str,
        params: dict[str, Any],
        task_id: str | None = None,
        lora_files: dict[str, bytes] | None = None,
        encode: bool = True,
    ):
        """Run one task; an async generator of the events described in the module docstring.

        ``encode``: whether a multi-GPU replica may hand back an encoded file; a 1-GPU replica always hands
        back frames, so it has nothing to change here (the argument keeps the two replicas' calls alike).

        ``lora_files``: ``<sha256>.safetensors`` -> object ref (or bytes) of the LoRAs the params name by that
        content name (`deployments.lora_fetch`); pulled and written only when this replica's LoRA folder
        lacks the file."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> None:
            try:
                if lora_files:  # object refs, pulled only when this replica lacks the file
                    store_lora_files(self.lora_dir, lora_files, read=object_bytes)
                started = time.time()
                rendered = self.engine.render(
                    task_type,
                    params,
                    task_id=task_id,
                    progress=lambda step, total: emit({"event": "progress", "step": step, "total": total}),
                    should_cancel=cancel.is_set,
                )
                self.recent.append({"task_id": task_id, "started": started, "finished": time.time()})
                emit({"event": "done", "rendered": rendered})
            except ValidationError as error:
                emit({"event": "error", "kind": "invalid", "message": describe_validation_error(error)})
            except Cancelled as error:
                emit({"event": "error", "kind": "cancelled", "message": str(error) or "cancelled"})
            except (EngineError, ValueError, FileNotFoundError) as error:
                emit({"event": "error", "kind": "invalid", "message": str(error)})
            except Exception as error:  # a real failure (out of memory, a bug): reported, replica stays up
                logger.exception("%s: task %s failed", self.family, task_id)
                emit({"event": "error", "kind": "engine", "message": f"{type(error).__name__}: {error}"})

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            started = time.perf_counter()
            reused = self.engine.loaded_model_id == model_id  # resident already (e.g. prefetched)
            try:
                await self._model(model_id)
            except Exception as error:
                yield {
                    "event": "error",
                    "kind": "invalid",
                    "message": f"cannot load model {model_id!r}: {error}",
                }
                return
            seconds = time.perf_counter() - started
            yield {"event": "loaded", "model": model_id, "seconds": seconds, "reused": reused}

        worker = loop.run_in_executor(None, run)
        try:
            while True:
                event = await events.get()
                yield event
                if event["event"] in ("done", "error"):
                    break
        except (asyncio.CancelledError, GeneratorExit):
            # The ingress cancelled the request: stop at the next denoising step, and keep this
            # replica busy until the engine has really stopped so the next task finds it free.
            cancel.set()
            await asyncio.shield(worker)
            raise
        await worker
        self.generations += 1
        model = self.engine.loaded_model_id or "?"
        self._generations.inc(tags={"model": model})

    async def prefetch(self, model_id: str) -> dict[str, Any]:
        """Load `model_id` ahead of the task that will need it (`deployments.prefetch`), through the same
        multiplexed loader as `generate`, so Serve's router then sends that task to this replica. Called
        with `multiplexed_model_id=model_id`; returns what the load took (0 s when it was resident)."""
        if serve.get_multiplexed_model_id() != model_id:
            raise ValueError(f"prefetch: multiplexed_model_id must be {model_id!r}")
        started, wall = time.perf_counter(), time.time()
        reused = self.engine.loaded_model_id == model_id
        await self._model(model_id)
        if not reused:
            self.prefetches += 1
            self.last_prefetch = {"model": model_id, "started": wall, "finished": time.time()}
        return {"model": model_id, "seconds": time.perf_counter() - started, "reused": reused}

    def stats(self) -> dict[str, Any]:
        """Counters for tests and operators: how often the engine really loaded, what is resident."""
        return {
            "family": self.family,
            "pid": os.getpid(),
            "load_count": self.engine.load_count,
            "loaded_model": self.engine.loaded_model_id,
            "generations": self.generations,
            "prefetches": self.prefetches,
            "last_prefetch": self.last_prefetch,
            "device": self.engine.device,
            "recent": list(self.recent),
            "prompt_cache": {
                "entries": len(self.engine.prompt_cache),
                "hits": self.engine.prompt_cache.hits,
                "misses": self.engine.prompt_cache.misses,
            },
        }

    def check_health(self) -> None:
        """Serve restarts a replica whose CUDA context broke or whose model cannot load."""
        if self.load_error is not None and self.engine.loaded_model_id is None:
            raise RuntimeError(f"{self.family}: cannot load a model: {self.load_error}")
        if str(self.engine.device).startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.engine.device)
            torch.zeros(1, device=self.engine.device).add_(1).item()
