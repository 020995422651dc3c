"""The task-type registry: every task type this application knows, in one place (Ray-free).

Each task type has a kind, the capacity pool the dispatcher claims it from and a params check:

    generation     one diffusers generation on a family deployment (T2V, VACE, Flux); the engine's own
                   `Wan2GP.catalog.TASK_FAMILIES` says which model family a type belongs to
    orchestration  a multi-step Ray DAG (travel, different perspective, joins, edits) whose steps are
                   generations; also a generation with CPU work around it (join_clips_segment,
                   inpaint_frames, individual_travel_segment)
    utility        a CPU utility run as a Ray task (pose, interpolation, frame extraction, joining clips)
    managed-row    a row mirroring an orchestration's step: driven by its orchestrator, never claimed
                   (`join_clips_segment` rows of a join / edit run are a claimable task type driven the
                   same way: see `dag/join.py`)

The config (which deployments exist), routing (what a task runs on) and the DAGs (what their steps
and mirror rows are called) all read it from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from dag import edit_plan, join_plan, perspective_plan, segment_plan, travel_plan
from dag.utilities import (
    UTILITY_INPUT_FIELDS,
    ExtractFrameParams,
    InterpolateParams,
    JoinClipsParams,
    OpenposeParams,
)
from Wan2GP.catalog import TASK_FAMILIES
from Wan2GP.params import parse_params

if TYPE_CHECKING:
    from dag.orchestrations import Orchestration

GENERATION = "generation"
ORCHESTRATION = "orchestration"
UTILITY = "utility"
MANAGED = "managed-row"

# The family deployments, and which one runs each model family: a generation goes where its resolved
# model's family lives.
DEPLOYMENTS: tuple[str, ...] = ("T2V", "VACE", "Flux", "Image")
FAMILY_DEPLOYMENT: dict[str, str] = {
    "t2v": "T2V",
    "i2v": "T2V",
    "flf2v": "T2V",
    "vace": "VACE",
    "flux": "Flux",
    "flux_kontext": "Flux",
    "qwen_image": "Image",
    "qwen_image_edit": "Image",
    "z_image": "Image",
}
# Capacity pools of the dispatcher besides the family deployments.
DAG_POOL = "DAG"
UTILITY_POOL = "Utility"

# Params of a generation that name input files: the dispatcher fetches them (URL, output location,
# allowed local path) and hands the replica their bytes, so a replica on another node needs no shared
# filesystem.
GENERATION_INPUT_FIELDS = (
    "image_start", "image_end", "video_guide", "video_mask", "image_url", "image_refs",
    # the image models' inputs (Wan2GP/image_params.py)
    "image", "mask_url", "style_reference_image", "subject_reference_image",
)  # fmt: skip


@dataclass(frozen=True)
class TaskType:
    name: str
    kind: str
    # The capacity pool the dispatcher claims it from: a family deployment, DAG_POOL or UTILITY_POOL;
    # None for managed rows. `single_image` / `generate_video` are claimed on T2V's capacity and
    # re-routed when their model belongs to another family.
    pool: str | None
    # Validates params (raises pydantic.ValidationError / ValueError naming the field); for
    # orchestrations it returns the payload's input references as (field, value) pairs.
    validate: Callable[[dict[str, Any]], Any] | None = None
    input_fields: tuple[str, ...] = ()  # params holding input references (generation, utility)
    step_type: str | None = None  # orchestrations: the generation task type their steps run
    # orchestrations: what implements `Orchestration`: a module ("dag.travel") or an object in one
    # ("dag.join:join_clips_segment")
    implementation: str | None = None


def _generation(name: str) -> TaskType:
    family = TASK_FAMILIES[name]
    return TaskType(
        name=name,
        kind=GENERATION,
        pool=FAMILY_DEPLOYMENT.get(family, "T2V"),
        validate=partial(parse_params, name),
        input_fields=GENERATION_INPUT_FIELDS,
    )


def _utility(name: str, params: type) -> TaskType:
    return TaskType(
        name=name,
        kind=UTILITY,
        pool=UTILITY_POOL,
        validate=params.model_validate,
        input_fields=UTILITY_INPUT_FIELDS,
    )


TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in [
        *(_generation(name) for name in TASK_FAMILIES),
        TaskType(
            "travel_orchestrator",
            ORCHESTRATION,
            DAG_POOL,
            validate=travel_plan.validate,
            step_type="vace",
            implementation="dag.travel",
        ),
        TaskType(
            "different_perspective_orchestrator",
            ORCHESTRATION,
            DAG_POOL,
            validate=perspective_plan.validate,
            step_type="vace",
            implementation="dag.perspective",
        ),
        # The original's newer task types (issue 20). A task of one VACE generation with CPU work around
        # it (join, inpaint, one travel segment) runs as a one-step orchestration: its CPU work in a Ray
        # task, its generation on the step deployment.
        TaskType(
            "join_clips_segment",
            ORCHESTRATION,
            DAG_POOL,
            validate=join_plan.validate_join_segment,
            step_type="vace",
            implementation="dag.join:join_clips_segment",
        ),
        TaskType(
            "join_clips_orchestrator",
            ORCHESTRATION,
            DAG_POOL,
            validate=join_plan.validate_join_orchestrator,
            step_type="vace",
            implementation="dag.join:join_clips_orchestrator",
        ),
        TaskType(
            "inpaint_frames",
            ORCHESTRATION,
            DAG_POOL,
            validate=edit_plan.validate_inpaint,
            step_type="vace",
            implementation="dag.edit:inpaint_frames",
        ),
        TaskType(
            "edit_video_orchestrator",
            ORCHESTRATION,
            DAG_POOL,
            validate=edit_plan.validate_edit_video,
            step_type="vace",
            implementation="dag.edit:edit_video_orchestrator",
        ),
        TaskType(
            "individual_travel_segment",
            ORCHESTRATION,
            DAG_POOL,
            validate=segment_plan.validate_individual_segment,
            step_type="vace",  # model_type "i2v" runs its one step as flf2v instead
            implementation="dag.individual_segment",
        ),
        _utility("generate_openpose", OpenposeParams),
        _utility("rife_interpolate_images", InterpolateParams),
        _utility("extract_frame", ExtractFrameParams),
        _utility("join_clips", JoinClipsParams),
        TaskType("travel_segment", MANAGED, None),
        TaskType("travel_stitch", MANAGED, None),
        TaskType("dp_final_gen", MANAGED, None),
    ]
}

# Names the DAGs give their mirror rows.
JOIN_CLIPS_SEGMENT = TASK_TYPES["join_clips_segment"].name
TRAVEL_SEGMENT = TASK_TYPES["travel_segment"].name
TRAVEL_STITCH = TASK_TYPES["travel_stitch"].name
PERSPECTIVE_FINAL = TASK_TYPES["dp_final_gen"].name


def task_type(name: str) -> TaskType | None:
    return TASK_TYPES.get(name)


def of_kind(kind: str) -> tuple[str, ...]:
    return tuple(name for name, t in TASK_TYPES.items() if t.kind == kind)


def pool_task_types(pool: str) -> tuple[str, ...]:
    """The task types claimed from one capacity pool."""
    return tuple(name for name, t in TASK_TYPES.items() if t.pool == pool)


def step_deployment(name: str) -> str:
    """The family deployment an orchestration's steps run on (by default: its step type's pool)."""
    step_type = TASK_TYPES[name].step_type
    if step_type is None:
        raise ValueError(f"{name!r} is not an orchestration")
    return TASK_TYPES[step_type].pool or ""


def parse_task_params(name: str, params: dict[str, Any]) -> Any:
    """Validate `params` with the task type's check (pydantic.ValidationError names the field)."""
    validate = TASK_TYPES[name].validate
    if validate is None:
        raise ValueError(f"task_type {name!r} has no params of its own")
    return validate(params)


def orchestration(name: str) -> Orchestration:
    """What runs an orchestration task type (imported on first use: it builds Ray DAGs)."""
    implementation = TASK_TYPES[name].implementation
    if implementation is None:
        raise ValueError(f"{name!r} is not an orchestration")
    module_name, _, attribute = implementation.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module  # type: ignore[return-value]
