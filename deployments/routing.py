"""Routing: what a task runs on, and whether it can run at all (Ray-free, HTTP-free).

The api calls `check` when a task is posted (nothing is written when it raises): `route`, then every
input reference checked without downloading it (local paths exist, URLs may be fetched). The
dispatcher calls `route` when it claims a row (rows written straight into the table were never
checked) and `fetch_inputs` (async, on the fetcher's own threads) before a generation takes GPU
capacity. `route` also enforces the work limits (`deployments.limits`) and the LoRA name rules. Problems are raised as domain errors
(`deployments.errors`: `InvalidTask` naming the field, `InvalidParams` carrying pydantic's errors); the api maps them to
422 and the dispatcher to a `Failed` row.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from dag.steps import STAND_INS
from dag.travel_plan import parse_travel, step_task_type
from dag.vace_control import check_vace_control, control_requested, without_control
from deployments.errors import InvalidParams, InvalidTask
from deployments.limits import (
    LimitSettings,
    check_decoded_video,
    check_generation,
    check_lists,
    check_travel,
)
from deployments.lora_fetch import LoraFetcher
from deployments.task_types import (
    DAG_POOL,
    FAMILY_DEPLOYMENT,
    GENERATION,
    MANAGED,
    ORCHESTRATION,
    TASK_TYPES,
    UTILITY,
    UTILITY_POOL,
    TaskType,
    step_deployment,
)
from storage import InputError, InputFetcher, kind_for_field
from Wan2GP.catalog import TASK_FAMILIES, Catalog, ModelDefinition, resolve_model
from Wan2GP.errors import EngineError
from Wan2GP.loras import LoraRefused, validate_loras
from Wan2GP.params import BaseParams, parse_params

VIDEO_FIELDS = ("video_guide", "video_mask")


@dataclass(frozen=True)
class Route:
    """Where a task runs: its registry entry, the capacity pool it takes and, for a generation, its model."""

    task_type: TaskType
    pool: str
    model_id: str | None = None

    @property
    def kind(self) -> str:
        return self.task_type.kind


def _without_inputs(params: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Params with input references swapped for small blank images, to validate and route a task
    without fetching its inputs (they are fetched once, when it runs)."""
    blank = np.zeros((16, 16, 3), dtype=np.uint8)
    swapped = dict(params)
    for name in fields:
        value = params.get(name)
        if value is None:
            continue
        if name in VIDEO_FIELDS:
            swapped[name] = blank[None]
        elif isinstance(value, list):
            swapped[name] = [blank for _ in value]
        else:
            swapped[name] = blank
    return swapped


class Routing:
    """Task type -> capacity pool and runner kind; model resolution; input checks and fetching."""

    def __init__(
        self,
        catalog: Catalog,
        default_models: dict[str, str],
        fetcher: InputFetcher,
        deployments: Iterable[str],
        limits: LimitSettings | None = None,
        loras: LoraFetcher | None = None,
    ):
        self.catalog = catalog
        self.loras = loras or LoraFetcher()
        self.default_models = default_models
        self.fetcher = fetcher
        self.deployments = frozenset(deployments)
        self.limits = limits or LimitSettings()
        # What this app serves: generations of its deployments, orchestrations whose steps it can run,
        # and every utility.
        self.served: dict[str, TaskType] = {
            name: entry for name, entry in TASK_TYPES.items() if self._can_serve(entry)
        }

    def _can_serve(self, entry: TaskType) -> bool:
        if entry.kind == GENERATION:
            return entry.pool in self.deployments
        if entry.kind == ORCHESTRATION:
            return step_deployment(entry.name) in self.deployments
        return entry.kind == UTILITY

    @property
    def served_task_types(self) -> set[str]:
        return set(self.served)

    def pools(self) -> dict[str, tuple[str, ...]]:
        """Capacity pool -> the task types claimed from it (only pools with something served)."""
        pools: dict[str, list[str]] = {}
        for name, entry in self.served.items():
            pools.setdefault(entry.pool or "", []).append(name)
        order = [*sorted(self.deployments), DAG_POOL, UTILITY_POOL]
        return {pool: tuple(pools[pool]) for pool in order if pool in pools}

    def is_managed(self, task_type: str) -> bool:
        entry = TASK_TYPES.get(task_type)
        return entry is not None and entry.kind == MANAGED

    # --- checks ------------------------------------------------------------------------------------

    def route(self, task_type: str, params: dict[str, Any]) -> Route:
        """The route of a task, after checking its type is served, its params are valid and within the
        work limits (inputs are not read). Raises InvalidTask / InvalidParams."""
        entry = self.served.get(task_type)
        if entry is None:
            served = ", ".join(sorted(self.served))
            raise InvalidTask("task_type", f"{task_type!r} is not served here; served: {served}")
        check_lists(params, self.limits)
        if entry.kind != GENERATION:
            try:
                entry.validate(params)  # type: ignore[misc]
                if entry.kind == ORCHESTRATION and task_type == "travel_orchestrator":
                    self._check_travel_work(entry, params)
            except ValidationError as error:
                raise InvalidParams(error) from None
            except InvalidTask:
                raise
            except ValueError as error:
                raise InvalidTask("params", str(error)) from None
            return Route(entry, entry.pool or "")
        parsed, definition = self._parse(task_type, params)
        check_lora_names(params)
        check_generation(parsed, definition, task_type, self.limits)
        if definition.family == "vace" and control_requested(params):
            try:
                check_vace_control(params)  # letters this service cannot honour: 422 naming the key
            except ValidationError as error:
                raise InvalidParams(error) from None
        deployment = FAMILY_DEPLOYMENT[definition.family]
        if deployment not in self.deployments:
            raise InvalidTask(
                "params.model",
                f"model {definition.id!r} is a {definition.family} model, which this app does not serve",
            )
        return Route(entry, deployment, definition.id)

    def _check_travel_work(self, entry: TaskType, params: dict[str, Any]) -> None:
        plan = parse_travel(params)
        steps = plan.segment_params_extra.get("num_inference_steps")
        if not isinstance(steps, int) or steps < 1:  # the step model's default (vace, or flf2v/i2v for i2v)
            step_type = step_task_type(plan)
            stand_in = {**STAND_INS[step_type], **({"model": plan.model} if plan.model else {})}
            steps = self.model(step_type, stand_in).defaults.num_inference_steps
        check_travel(plan, steps, self.limits)

    def input_refs(self, route: Route, params: dict[str, Any]) -> list[tuple[str, str]]:
        """(field label, reference) of every input a task names: `image_refs[2]`, `anchors[0]`, ..."""
        if route.kind == ORCHESTRATION:
            references = route.task_type.validate(params)  # type: ignore[misc]
        else:
            references = [(name, params.get(name)) for name in route.task_type.input_fields]
        refs = []
        for name, value in references:
            items = value if isinstance(value, list) else [value]
            for i, ref in enumerate(items):
                if isinstance(ref, str) and ref:
                    refs.append((f"{name}[{i}]" if isinstance(value, list) else name, ref))
        return refs

    async def check(self, route: Route, params: dict[str, Any]) -> None:
        """Every input reference of a routed task checked without downloading it: local paths and
        outputs exist, URLs are http(s) to an allowed address. Raises InvalidTask("params.<field>")."""
        for label, ref in self.input_refs(route, params):
            try:
                await self.fetcher.check_async(ref, field=label)
            except InputError as error:
                raise InvalidTask(f"params.{label}", error.problem) from None
        await asyncio.to_thread(self._check_lora_urls, route, params)

    def model(self, task_type: str, params: dict[str, Any]) -> ModelDefinition:
        """The model a generation runs on. Raises InvalidParams / InvalidTask("params.model")."""
        return self._parse(task_type, params)[1]

    def parse(self, task_type: str, params: dict[str, Any]) -> tuple[BaseParams, ModelDefinition]:
        """A generation's parsed params and model (inputs left out). Raises InvalidParams / InvalidTask."""
        return self._parse(task_type, params)

    def _parse(self, task_type: str, params: dict[str, Any]) -> tuple[BaseParams, ModelDefinition]:
        try:
            if TASK_FAMILIES.get(task_type) == "vace":
                params = without_control(params)  # the control step checks and consumes those keys
            parsed = parse_params(task_type, _without_inputs(params, TASK_TYPES[task_type].input_fields))
            return parsed, resolve_model(self.catalog, self.default_models, task_type, parsed)
        except ValidationError as error:
            raise InvalidParams(error) from None
        except (EngineError, ValueError) as error:
            raise InvalidTask("params.model", str(error)) from None

    def _check_lora_urls(self, route: Route, params: dict[str, Any]) -> None:
        """LoRA URLs of a generation or an orchestration's steps: downloads allowed, .safetensors, pin
        syntax, SSRF guard (InvalidTask)."""
        if route.kind in (GENERATION, ORCHESTRATION):
            self.loras.check(params)

    # --- inputs ------------------------------------------------------------------------------------

    async def fetch_inputs(
        self, params: dict[str, Any], fields: Iterable[str], cancel: threading.Event | None = None
    ) -> dict[str, Any]:
        """The params with each input reference replaced by the file's bytes. Downloads run on the
        fetcher's own threads (never the dispatcher's pool); setting `cancel`, or cancelling the awaiting
        task, aborts them. Videos are checked against the decode limits first. Raises InputError."""
        resolved = dict(params)
        for name in fields:
            value = params.get(name)
            if isinstance(value, str) and value:
                path = await self.fetcher.fetch_async(value, field=name, cancel=cancel)
                await self._check_video(name, path, name)
                resolved[name] = path.read_bytes()
            elif isinstance(value, list):
                paths = await self.fetcher.fetch_many_async(value, field=name, cancel=cancel)
                for i, path in enumerate(paths):
                    await self._check_video(name, path, f"{name}[{i}]")
                resolved[name] = [p.read_bytes() for p in paths]
        return resolved

    def fetch_loras(
        self, params: dict[str, Any], cancel: threading.Event | None = None
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The params with LoRA URLs replaced by content names, and those files' bytes (blocking;
        InputError). See `deployments.lora_fetch`."""
        return self.loras.fetch(params, cancel)

    async def _check_video(self, name: str, path: Path, label: str) -> None:
        if name == "clips" or kind_for_field(name) == "video":
            await asyncio.to_thread(check_decoded_video, path, label, self.limits)


# --- LoRA names ----------------------------------------------------------------------------------------


def check_lora_names(params: dict[str, Any]) -> list[str]:
    """Refuse LoRA names that could reach files outside the LoRA folders (InvalidTask naming the field);
    returns the LoRA URLs the task names (fetched when it runs). The rule itself is the engine's
    (`Wan2GP.loras.check_lora_name`): no absolute paths, '~' or '..', `.safetensors` files only."""
    try:
        return validate_loras(params)
    except LoraRefused as error:
        field, _, problem = str(error).partition(": ")
        raise InvalidTask(f"params.{field}", problem) from None
