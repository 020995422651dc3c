"""A completed task's `result`: what ran and where the time went, stored with the row (`Task.result`).

Everything about the generation comes from the artifact's metadata as the engine (or the DAG that made
it) reported it: model, seed actually used, resolution, frames, fps, steps, guidance, LoRAs as applied,
phases, ignored params, ... Nothing is filled in here that the producer did not say. Added here:

    output   {"bytes", "media_type", "filename", "uploaded"}
    timings  seconds per stage, the engine's and the deployment's in one vocabulary:
             queue_wait   created -> claimed (both stamped by the database)
             input_fetch  downloading / resolving the task's inputs (the runner)
             load         making the model resident (the replica's multiplexed load plus the engine's own)
             text_encode, denoise, decode   the engine on the replica (text_encode ~0 on a cached prompt:
                          `acceleration.text_encode_cache` counts the hits)
             encode       the mp4/png encoding, in a CPU Ray task after the replica handed the frames back
                          (`encode_started_at`: when it began, epoch seconds)
             save         the local write plus the upload when one is configured (`output.uploaded`)
             guide, step_call   a travel segment's: building its guide and mask, and its generation's
                          round trip from the DAG node (the replica's stages above plus the transfers)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from db.models import Task
from Wan2GP.artifact import Artifact

# The engine's timing names -> the result's.
ENGINE_TIMINGS = {"encode_prompt": "text_encode", "encode_file": "encode"}


def task_result(
    task: Task | None,
    artifact: Artifact,
    uploaded: bool,
    deployment_timings: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The `result` of `task`, completed with `artifact` (`deployment_timings`: the dispatcher's and the
    runner's stages, e.g. `Job.timings`). Without `task` (a row an orchestration drives) there is no
    queue wait."""
    metadata = dict(artifact.metadata)
    engine_timings = metadata.pop("timings", None) or {}
    timings: dict[str, float] = {}
    if task is not None and task.generation_started_at is not None:
        timings["queue_wait"] = (task.generation_started_at - task.created_at).total_seconds()
    for name, seconds in engine_timings.items():
        if isinstance(seconds, int | float):
            timings[ENGINE_TIMINGS.get(name, name)] = float(seconds)
    for name, seconds in (deployment_timings or {}).items():
        timings[name] = timings.get(name, 0.0) + seconds  # e.g. the replica's load + the engine's
    result = {
        **metadata,
        "output": {
            "bytes": artifact.size,
            "media_type": artifact.media_type,
            "filename": artifact.filename,
            "uploaded": uploaded,
        },
        "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
    }
    return json_safe(result)


def json_safe(value: Any) -> Any:
    """`value` as plain JSON data: tuples become lists, non-finite floats None, other objects their str."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:  # numpy scalars
        return json_safe(value.item())
    except (AttributeError, ValueError):
        return str(value)
