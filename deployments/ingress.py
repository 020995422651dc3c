"""The ingress: the Ray Serve deployment that wires the api, the dispatcher and the Ray runners.

It is the only deployment that touches the tasks table and storage. It builds the store, the output
storage, the input fetcher and routing from the config, gives the dispatcher one runner per kind
(family deployment handles for generations, Ray DAGs for orchestrations, Ray tasks for utilities),
serves `deployments.api` over them, and on shutdown lets the dispatcher hand unfinished work back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from db.models import Task
from db.store import TaskStore, open_store
from deployments.api import create_app
from deployments.auth import open_keys
from deployments.config import AppConfig, split_deployment_name
from deployments.dispatcher import BlockingPool, Dispatcher
from deployments.events import EventBus
from deployments.lora_fetch import LoraFetcher
from deployments.recovery import new_worker_id, stable_identity
from deployments.routing import Routing
from deployments.runners import GenerationRunner, OrchestrationRunner, UtilityRunner
from deployments.scheduling import FamilyScheduler, Pool
from deployments.task_types import DAG_POOL, GENERATION, ORCHESTRATION, UTILITY, UTILITY_POOL
from deployments.webhooks import WebhookNotifier, WebhookSender
from storage import InputFetcher, OutputStorage
from Wan2GP.catalog import Catalog

logger = logging.getLogger("ray.serve")

# How long /replicas waits for every replica's stats (a replica running a generation answers after it).
REPLICA_STATS_S = 2.0


def family_schedulers(config: AppConfig) -> dict[str, FamilyScheduler]:
    """A scheduler for each family that has a split pool beside its 1-GPU replicas."""
    schedulers = {}
    for name, deployment in config.deployments.items():
        if deployment.split is None:
            continue
        replicas = Pool(name, 1, deployment.max_replicas, deployment.replica_capacity)
        split = Pool(
            split_deployment_name(name),
            deployment.split.gpus_per_replica,
            deployment.split.replicas,
            deployment.split_capacity,
            deployment.split.parallel_mode,
        )
        schedulers[name] = FamilyScheduler(name, replicas, split)
    return schedulers


class ServeMetrics:
    """The dispatcher's events as Ray Serve metrics."""

    def __init__(self) -> None:
        self.m_claimed = Counter("hwgp_tasks_claimed", description="Tasks claimed.", tag_keys=("task_type",))
        self.m_completed = Counter(
            "hwgp_tasks_completed", description="Tasks completed.", tag_keys=("task_type",)
        )
        self.m_failed = Counter("hwgp_tasks_failed", description="Tasks failed.", tag_keys=("task_type",))
        self.m_generation = Histogram(
            "hwgp_generation_seconds",
            description="Claim to stored output, per model.",
            boundaries=[1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600],
            tag_keys=("model",),
        )
        self.m_queue = Gauge("hwgp_queue_depth", description="Queued tasks this ingress serves.")
        self.m_in_flight = Gauge("hwgp_in_flight", description="Tasks running from this ingress.")
        self.m_unserved = Gauge(
            "hwgp_unserved_queued",
            description="Queued tasks of a type this application does not serve.",
            tag_keys=("task_type",),
        )
        self._unserved_types: set[str] = set()

    def claimed(self, task: Task) -> None:
        self.m_claimed.inc(tags={"task_type": task.task_type})

    def completed(self, task: Task, seconds: float, model_id: str) -> None:
        self.m_completed.inc(tags={"task_type": task.task_type})
        self.m_generation.observe(seconds, tags={"model": model_id})

    def failed(self, task: Task) -> None:
        self.m_failed.inc(tags={"task_type": task.task_type})

    def queue_depth(self, queued: int) -> None:
        self.m_queue.set(queued)

    def in_flight(self, running: int) -> None:
        self.m_in_flight.set(running)

    def unserved(self, queued_by_type: dict[str, int]) -> None:
        for task_type in (
            self._unserved_types - queued_by_type.keys()
        ):  # gone since: show 0, not the last count
            self.m_unserved.set(0, tags={"task_type": task_type})
        for task_type, queued in queued_by_type.items():
            self.m_unserved.set(queued, tags={"task_type": task_type})
        self._unserved_types |= queued_by_type.keys()


@serve.deployment(max_ongoing_requests=200)
@serve.ingress()
class Ingress:
    def __init__(
        self, config: dict[str, Any], default_models: dict[str, str], handles: dict[str, DeploymentHandle]
    ):
        self.config = AppConfig.model_validate(config)
        settings = self.config.ingress
        self.handles = handles
        self.store: TaskStore = open_store(os.environ.get("HWGP_DB") or self.config.db)
        self.storage = (
            OutputStorage.from_dict(self.config.storage) if self.config.storage else OutputStorage()
        )
        self.keys = open_keys(self.config.auth)  # a keys file that cannot be read refuses to start
        self.fetcher = InputFetcher(
            self.config.input_dirs, outputs=self.storage, **self.config.inputs.model_dump()
        )
        self.routing = Routing(
            Catalog.load(self.config.models_dir),
            default_models,
            self.fetcher,
            self.config.deployments,  # the families (handles also hold their split pools)
            limits=self.config.limits,
            loras=LoraFetcher(self.config.loras, input_url_allow=self.config.inputs.input_url_allow),
        )
        # How many tasks may run at once, per capacity pool.
        capacity = {name: deployment.capacity for name, deployment in self.config.deployments.items()}
        capacity[DAG_POOL] = settings.orchestration_capacity
        capacity[UTILITY_POOL] = settings.utility_capacity
        self.pool = BlockingPool(settings.threads)
        # Stable across restarts (one per app per host) plus an incarnation: the dispatcher's first
        # maintenance takes back the tasks a killed predecessor held (deployments/recovery.py).
        worker_id = new_worker_id(stable_identity(serve.get_replica_context().app_name))
        runners = {
            GENERATION: GenerationRunner(handles, self.routing),
            ORCHESTRATION: OrchestrationRunner(
                self.store, self.storage, self.fetcher, self.routing, handles, worker_id
            ),
            UTILITY: UtilityRunner(self.store, self.routing),
        }
        # Live events for /tasks/{id}/events and webhooks: both observe the dispatcher.
        self.events = EventBus()
        self.webhook_sender = WebhookSender(self.config.webhooks)
        if self.config.webhooks.default_url:
            self.webhook_sender.check_url(self.config.webhooks.default_url)  # a bad default fails at start
        self.webhooks = WebhookNotifier(self.webhook_sender)
        self.dispatcher = Dispatcher(
            self.store,
            self.storage,
            self.routing,
            runners,
            capacity,
            settings,
            pool=self.pool,
            metrics=ServeMetrics(),
            worker_id=worker_id,
            observers=[self.events, self.webhooks],
            schedulers=family_schedulers(self.config),
            # multi-GPU replicas load their model per task on every rank: nothing to load ahead there
            prefetch_deployments=[
                name
                for name, deployment in self.config.deployments.items()
                if deployment.gpus_per_replica == 1
            ],
        )
        self.dispatcher.start()
        logger.info(
            "ingress %s serving %s over %s", self.dispatcher.worker_id, sorted(handles), self.store.url
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(
            store=self.store,
            storage=self.storage,
            routing=self.routing,
            dispatcher=self.dispatcher,
            pool=self.pool,
            max_request_bytes=self.config.ingress.max_request_bytes,
            replica_stats=self.replica_stats,
            events=self.events,
            webhooks=self.webhook_sender,
            keys=self.keys,
        )

    async def replica_stats(self) -> dict[str, Any]:
        """Each deployment's counters as one of its replicas reports them, plus (`replicas`) every replica's,
        when they answer within REPLICA_STATS_S (a replica busy with a generation does not); and, for a family
        with a split pool, `scheduling`: both pools, busy/idle, the queue and the policy's last decision."""
        names = list(self.handles)
        # A replica runs one request at a time: while every replica generates, its stats wait behind it.
        one = [asyncio.wait_for(self.handles[name].stats.remote(), REPLICA_STATS_S) for name in names]
        every = [
            self.handles[name].broadcast("stats").results_async(timeout_s=REPLICA_STATS_S) for name in names
        ]
        answers = await asyncio.gather(*one, *every, return_exceptions=True)
        results, every = answers[: len(names)], answers[len(names) :]
        stats: dict[str, Any] = {}
        for name, one, replicas in zip(names, results, every, strict=True):
            if isinstance(one, TimeoutError):
                entry = {"error": f"every replica busy: no answer within {REPLICA_STATS_S:g} s"}
            else:
                entry = one if not isinstance(one, BaseException) else {"error": str(one)}
            if isinstance(replicas, BaseException):
                entry["replicas"] = {"error": f"{type(replicas).__name__}: {replicas}"}
            else:
                entry["replicas"] = replicas
            stats[name] = entry
        scheduling = self.dispatcher.status().scheduling
        if scheduling:
            stats["scheduling"] = scheduling
        return stats

    async def __del__(self) -> None:
        """Graceful shutdown: stop claiming, let in-flight work finish, give the rest back."""
        await self.dispatcher.stop()
        self.routing.loras.close()
        await self.webhooks.close()
        self.fetcher.close()
        self.store.close()
        self.pool.close()
