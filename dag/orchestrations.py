"""What an orchestration (a multi-step task type run as a Ray DAG) is given and must offer.

The registry (`deployments.task_types`) names the module implementing each orchestration task type;
the dispatcher's DAG runner calls `prepare`, `execute`, then `finish` (or `abort`); the API calls
`validate` through the registry. Ray-free: the handles are opaque here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

from db.models import Task
from db.store import TaskStore
from storage import InputFetcher, OutputStorage
from Wan2GP.artifact import Artifact

T = TypeVar("T")


@dataclass(frozen=True)
class StepTarget:
    """Where an orchestration's generation steps go: the deployment handle and the model to ask for."""

    task_type: str  # the generation task type of the steps ("vace")
    handle: Any  # a DeploymentHandle of the family deployment serving that model
    model_id: str
    # <sha256>.safetensors -> object ref of the LoRAs fetched by URL at claim time (deployments.lora_fetch)
    lora_files: dict[str, Any] = field(default_factory=dict)
    family: str = ""  # the family deployment serving the model (its pools are scheduled together)
    # Where a placed step runs and why ({deployment, pool, reason}); None before placement, or for a
    # family without a split pool. Recorded as the step row's result `scheduling`.
    scheduling: dict[str, str] | None = None


class StepPlacement(Protocol):
    """One step's slot on its family (`RunContext.place`): asked for when made (the step counts as
    waiting from then on), `async with` waits for a free slot and gives the target on the pool the
    scheduler chose; leaving the block returns the slot. `withdraw` gives up one never entered."""

    async def __aenter__(self) -> StepTarget: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def withdraw(self) -> None: ...


@dataclass
class Unplaced:
    """The placement of a step on a family without a split pool: its replicas, as Serve routes it."""

    target: StepTarget

    async def __aenter__(self) -> StepTarget:
        return self.target

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def withdraw(self) -> None:
        return None


def unplaced(target: StepTarget, step_id: str, params: dict[str, Any] | None = None) -> StepPlacement:
    return Unplaced(target)


@dataclass
class RunContext:
    """Everything an orchestration may use while it runs."""

    store: TaskStore
    storage: OutputStorage
    fetcher: InputFetcher
    worker_id: str
    # The step target for a step's params (model resolution and the deployment serving it); a second
    # argument `task_type=` routes a step of another generation type than the orchestration's.
    step: Callable[..., StepTarget]
    # Runs a blocking call (store, storage, fetch) on the dispatcher's thread pool.
    blocking: Callable[..., Awaitable[Any]]
    # place(target, step_id, params): the slot one step runs in, chosen by the family's scheduler in the
    # dispatcher's process (deployments/scheduling.py) right before the step's Ray task is launched with
    # the handle it gives. `params`: the step's generation params as far as known (its guidance keys,
    # `model`), for the CFG check. Ask for the steps that run together at once (a burst), one at a time
    # for a chain.
    place: Callable[..., StepPlacement] = unplaced


class OrchestrationRun(Protocol):
    task: Task

    @property
    def row_ids(self) -> list[str]:
        """Rows mirroring the steps: heartbeated with the orchestrator so they never look stale."""
        ...

    def cancel(self) -> None: ...


class Orchestration(Protocol):
    """A module such as `dag.travel` or `dag.perspective`."""

    def validate(self, params: dict[str, Any]) -> list[tuple[str, Any]]:
        """Check a payload (pydantic.ValidationError names the field); returns its input references."""
        ...

    def prepare(self, ctx: RunContext, task: Task) -> OrchestrationRun:
        """Parse, plan and create the mirror rows (blocking)."""
        ...

    async def execute(self, ctx: RunContext, run: Any) -> Artifact: ...

    def finish(self, ctx: RunContext, run: Any, output_location: str) -> None:
        """The output is stored: complete the mirror rows (blocking)."""
        ...

    def abort(self, ctx: RunContext, run: Any, message: str, cancelled: bool) -> None:
        """The run failed or was cancelled: its unfinished rows say so (blocking)."""
        ...
