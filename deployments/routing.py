"""Routing: what a task runs on, and whether it can run at all (Ray-free, HTTP-free).

The api calls `check` when a task is posted (nothing is written when it raises); the dispatcher
calls `route` when it claims a row (rows written straight into the table were never checked) and
`fetch_inputs` before a generation takes GPU capacity. Problems are raised as domain errors
(`deployments.errors`: `InvalidTask` naming the field, `InvalidParams` carrying pydantic's errors); the api maps them to
422 and the dispatcher to a `Failed` row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from deployments.errors import InvalidParams, InvalidTask
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
from storage import InputError, InputFetcher
from Wan2GP.catalog import Catalog, ModelDefinition
from Wan2GP.engine import resolve_model
from Wan2GP.errors import EngineError
from Wan2GP.params import parse_params

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
        loras: LoraFetcher | None = None,
    ):
        self.catalog = catalog
        self.loras = loras or LoraFetcher()
        self.default_models = default_models
        self.fetcher = fetcher
        self.deployments = frozenset(deployments)
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
        """The route of a task, after checking its type is served and its params are valid (inputs are
        not read). Raises InvalidTask / InvalidParams."""
        entry = self.served.get(task_type)
        if entry is None:
            served = ", ".join(sorted(self.served))
            raise InvalidTask("task_type", f"{task_type!r} is not served here; served: {served}")
        if entry.kind != GENERATION:
            try:
                entry.validate(params)  # type: ignore[misc]
            except ValidationError as error:
                raise InvalidParams(error) from None
            except ValueError as error:
                raise InvalidTask("params", str(error)) from None
            return Route(entry, entry.pool or "")
        definition = self.model(task_type, params)
        deployment = FAMILY_DEPLOYMENT[definition.family]
        if deployment not in self.deployments:
            raise InvalidTask(
                "params.model",
                f"model {definition.id!r} is a {definition.family} model, which this app does not serve",
            )
        return Route(entry, deployment, definition.id)

    def check(self, task_type: str, params: dict[str, Any]) -> Route:
        """`route`, plus every local input path checked (blocking: run it off the event loop)."""
        route = self.route(task_type, params)
        if route.kind == ORCHESTRATION:
            references = route.task_type.validate(params)  # type: ignore[misc]
        else:
            references = [(name, params.get(name)) for name in route.task_type.input_fields]
        for name, value in references:
            self._check_local_input(name, value)
        self._check_lora_urls(route, params)
        return route

    def model(self, task_type: str, params: dict[str, Any]) -> ModelDefinition:
        """The model a generation runs on. Raises InvalidParams / InvalidTask("params.model")."""
        try:
            parsed = parse_params(task_type, _without_inputs(params, TASK_TYPES[task_type].input_fields))
            return resolve_model(self.catalog, self.default_models, task_type, parsed)
        except ValidationError as error:
            raise InvalidParams(error) from None
        except (EngineError, ValueError) as error:
            raise InvalidTask("params.model", str(error)) from None

    def _check_local_input(self, name: str, value: Any) -> None:
        refs = value if isinstance(value, list) else [value]
        for i, ref in enumerate(refs):
            # Local paths and output locations only: URLs are fetched once, when the task runs.
            if isinstance(ref, str) and "://" not in ref:
                label = f"{name}[{i}]" if isinstance(value, list) else name
                try:
                    self.fetcher.fetch(ref, field=label)
                except InputError as error:
                    raise InvalidTask(f"params.{label}", str(error)) from None

    def _check_lora_urls(self, route: Route, params: dict[str, Any]) -> None:
        """LoRA URLs of a generation or an orchestration's steps: downloads allowed, .safetensors, pin
        syntax, SSRF guard (InvalidTask)."""
        if route.kind in (GENERATION, ORCHESTRATION):
            self.loras.check(params)

    # --- inputs ------------------------------------------------------------------------------------

    def fetch_inputs(self, params: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        """The params with each input reference replaced by the file's bytes (blocking; InputError)."""
        resolved = dict(params)
        for name in fields:
            value = params.get(name)
            if isinstance(value, str):
                resolved[name] = self.fetcher.fetch(value, field=name).read_bytes()
            elif isinstance(value, list):
                resolved[name] = [p.read_bytes() for p in self.fetcher.fetch_many(value, field=name)]
        return resolved

    def fetch_loras(
        self, params: dict[str, Any], cancel: threading.Event | None = None
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The params with LoRA URLs replaced by content names, and those files' bytes (blocking;
        InputError). See `deployments.lora_fetch`."""
        return self.loras.fetch(params, cancel)
