"""`travel_orchestrator` as a Ray DAG: segment nodes (VACE generations) → stitch node.

The dispatcher's DAG runner calls `validate` at the API, then `prepare`, `execute` and `finish` (or `abort`). It plans the segments, mirrors them in the tasks table (one
`travel_segment` row per segment and one `travel_stitch` row, with deterministic ids so a re-claimed
orchestrator finds them again), then runs the segments' Ray tasks, each launched once the family's
scheduler gives it a slot (`RunContext.place`: a chain asks for one at a time, independent segments all at
once), with clips passed between tasks as object refs:

    chained VACE: anchors ─> seg0 ──> seg1 ──> seg2
                              └> piece0 └> piece1 └> piece2 ─> stitch (piece i: clips i-1 and i)
    independent:  anchors ─> seg0, seg1, seg2     (chain_segments false, or model_type i2v: segments run in
                                                   parallel across replicas; each is its own clip and the
                                                   run's output is the last one, as in the original)

A chain's video is encoded in pieces as its clips come (`dag.travel_plan.stitch_pieces`: each clip's piece
holds its cross-fade from the previous clip), each while the next segment generates; the stitch joins
the encoded pieces without re-encoding, so only the last piece is left when the last segment is done.

Intermediate clips travel as Ray objects, never through the database. Segments whose rows are
already `Complete` (a resumed run) enter as constants loaded from their stored outputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import ray
from pydantic import ValidationError

from dag.orchestrations import RunContext, StepPlacement, StepTarget
from dag.steps import STAND_INS, StepFailed, render_step
from dag.travel_plan import (
    SegmentSpec,
    StitchPiece,
    TravelPlan,
    adjust_clip,
    colour_reference,
    final_filename,
    image_segment_task,
    parse_travel,
    plan_segments,
    segment_filename,
    segment_guide,
    segment_params,
    step_task_type,
    stitch_piece,
    stitch_pieces,
    structure_references,
    travel_structure,
    validate,
)
from db.models import NewTask, Task, TaskStatus
from db.store import TaskNotFound, TaskStore
from deployments.errors import describe_validation_error
from deployments.results import task_result
from deployments.task_types import TRAVEL_SEGMENT, TRAVEL_STITCH
from deployments.thumbnail_step import save_row_thumbnail, save_thumbnail
from Wan2GP.artifact import Artifact, Rendered
from Wan2GP.structure import ControlVideo, StructureGuidance, apply_control, build_control_video
from Wan2GP.video import decode_video, encode_mp4, join_mp4, load_image, mask_to_video

__all__ = ["abort", "execute", "finish", "prepare", "validate"]  # the Orchestration protocol

logger = logging.getLogger("ray.serve")

# A failed or cancelled run still saves the segments it generated (a resumed run reuses them), this long.
RECORD_GRACE_S = 120.0


# --- DAG nodes (Ray tasks: CPU work, never on a GPU replica's time) ---------------------------------


@ray.remote(num_cpus=0.05, max_retries=0)
def control_node(plan: TravelPlan, guidance: StructureGuidance, videos: dict[str, bytes]) -> ControlVideo:
    """The run's structure guidance as one VACE control video over the stitched timeline (built once)."""
    try:
        return build_control_video(
            guidance, plan.timeline_frames, plan.width, plan.height, plan.fps,
            load_video=lambda path: decode_video(videos[path]),
        )  # fmt: skip
    except ValidationError as error:
        raise StepFailed(describe_validation_error(error)) from None


@ray.remote(num_cpus=0.05, max_retries=0, num_returns=2)
def segment_node(
    plan: TravelPlan, spec: Any, previous: np.ndarray | None, anchors: list[np.ndarray], step: StepTarget,
    task_id: str, control: ControlVideo | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Generate segment `spec` on the step deployment: VACE (a guide and mask from the anchors and
    `previous`, the previous clip or the continued video), or image-to-video between its anchors.

    Two returns, so the chain never waits on a file and the orchestrator never pulls frames: the clip's
    frames (uint8, exactly as the replica decoded them: the next segment's guide and the stitch take them
    from here) and a small description (`segment_file_node` makes the segment's MP4 from both, while the
    next segment generates). An unstitched segment is post-processed here: its clip is an output of the run."""
    guide = mask = None
    started = time.perf_counter()
    if plan.mode == "i2v":
        task_type, params = image_segment_task(plan, spec, *_segment_images(spec, anchors, previous))
    else:
        guide, mask = segment_guide(plan, spec, previous, anchors)
        if control is not None:  # structure guidance: control frames in the frames this segment generates
            guide = apply_control(guide, mask, control, offset=spec.start)
        task_type, params = "vace", segment_params(plan, spec, guide, mask)
    called = time.perf_counter()
    try:
        output = render_step(step.handle, step.model_id, task_type, params, task_id, step.lora_files)
    except StepFailed as error:
        raise StepFailed(f"segment {spec.index}: {error}") from None
    # Where the segment's time went outside the engine: its inputs, and the step's whole round trip (the
    # replica's load / text_encode / denoise / decode, plus moving params and frames through Serve).
    output.metadata["timings"] = {
        **output.metadata.get("timings", {}),
        "guide": round(called - started, 4),
        "step_call": round(time.perf_counter() - called, 4),
    }
    # A multi-GPU replica encodes on its ranks: that file is the segment's, its frames are read back.
    encoded = output if isinstance(output, Artifact) else None
    frames = decode_video(encoded.data)[0] if encoded is not None else output.frames
    if not plan.stitched and _adjusts(plan, spec.index):
        continued = previous if spec.index == 0 else None
        references = (
            colour_reference(plan, anchors, spec.index, continued) if plan.post.colour_match else None
        )
        frames = adjust_clip(plan, spec.index, frames, references, bool(plan.continue_from_video))
        encoded = None  # the adjusted frames make the file
    described: dict[str, Any] = {"index": spec.index, "frames": len(frames), "metadata": output.metadata}
    if encoded is not None:
        described["artifact"] = encoded
    if (plan.debug or plan.skip_cleanup) and guide is not None:
        described["guide"] = encode_mp4(guide, fps=plan.fps)
        described["mask"] = encode_mp4(mask_to_video(mask), fps=plan.fps)
    return frames, described


@ray.remote(num_cpus=0.05, max_retries=0)
def segment_file_node(plan: TravelPlan, frames: np.ndarray, described: dict[str, Any]) -> dict[str, Any]:
    """`described` with the segment's stored MP4 as its `artifact`: the replica's own file, or the frames
    encoded here (off the chain: the next segment already runs)."""
    artifact = described.get("artifact")
    if artifact is None:
        artifact = Rendered(frames, plan.fps, "segment", described["metadata"]).encode()
    artifact.filename = segment_filename(plan.run_id, described["index"])
    return {**described, "artifact": artifact}


def _segment_images(
    spec: SegmentSpec, anchors: list[np.ndarray], continued: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(start image, end image or None) of an image-to-video segment, from its anchor placements."""
    placed = dict(spec.anchors)  # frame index -> anchor index
    if spec.start_from_video:
        if continued is None:
            raise ValueError(f"segment {spec.index} starts from the continued video, which was not given")
        start = continued[-1]
    else:
        start = anchors[placed[0]]
    end = anchors[placed[spec.frames - 1]] if spec.frames - 1 in placed else None
    return start, end


def _adjusts(plan: TravelPlan, index: int) -> bool:
    """Whether the per-clip post-processing changes segment `index` (saturation and brightness act on the
    clips after the first, and on every clip of a continued run)."""
    post = plan.post
    tonal = post.saturation != 1.0 or post.brightness != 0.0
    return post.colour_match or (tonal and (index > 0 or bool(plan.continue_from_video)))


@ray.remote(num_cpus=0.05, max_retries=0)
def stitch_piece_node(
    plan: TravelPlan, piece: StitchPiece, anchors: list[np.ndarray], continued: np.ndarray | None,
    *clips: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """One piece of the run's video, encoded: launched as soon as its clips exist, so it runs while the
    chain generates the next segments and only the last piece is left when the last segment is done."""
    frames = stitch_piece(plan, piece, list(clips), anchors or None, continued)
    height, width = frames.shape[1:3]
    return {"data": encode_mp4(frames, fps=plan.fps), "frames": len(frames), "width": width, "height": height}


@ray.remote(num_cpus=0.05, max_retries=0)
def stitch_node(plan: TravelPlan, *pieces: dict[str, Any]) -> Artifact:
    """The run's video: its encoded pieces, in order, joined without re-encoding."""
    frames = sum(piece["frames"] for piece in pieces)
    expected = plan.total_frames
    if plan.debug:
        logger.info(
            "[STITCH_DEBUG] %s: segments %s frames, overlaps %s -> expected %d, got %d in %d pieces",
            plan.run_id, plan.generated_frames, plan.overlaps, expected, frames, len(pieces),
        )  # fmt: skip
    return Artifact(
        data=join_mp4([piece["data"] for piece in pieces], [piece["frames"] for piece in pieces], plan.fps),
        filename=final_filename(plan.run_id),
        media_type="video/mp4",
        metadata={
            "frames": frames,
            "expected_frames": expected,
            "fps": plan.fps,
            "width": pieces[0]["width"],
            "height": pieces[0]["height"],
            "segments": plan.num_segments,
            "chain_segments": plan.chain_segments,
            "model_type": plan.mode,
            "overlap_mode": plan.overlap_mode,
            "stitched": True,
            "ignored_params": plan.ignored_params,
        },
    )


# --- orchestration (runs in the dispatcher) --------------------------------------------------------------


def mirror_id(orchestrator_id: str, name: str) -> str:
    """Deterministic row ids: a re-claimed orchestrator finds the rows its first attempt made."""
    return str(uuid.uuid5(uuid.UUID(orchestrator_id), name))


@dataclass
class TravelRun:
    task: Task
    plan: TravelPlan
    segment_ids: list[str]
    stitch_id: str | None  # None when the run is not stitched (no travel_stitch row, as in the original)
    structure: StructureGuidance | None = None
    refs: list[ray.ObjectRef] | None = None
    output: Artifact | None = None  # the run's final video, for the stitch row's thumbnail in `finish`

    def cancel(self) -> None:
        for ref in self.refs or []:
            ray.cancel(ref, recursive=True)

    @property
    def row_ids(self) -> list[str]:
        return [*self.segment_ids, *([self.stitch_id] if self.stitch_id else [])]


def prepare(ctx: RunContext, task: Task) -> TravelRun:
    """Parse and plan (raises pydantic.ValidationError naming the field), then make the mirror rows."""
    plan = parse_travel(task.params, default_run_id=task.id)  # a resumed run keeps its file names
    specs = plan_segments(plan)
    segment_ids = [mirror_id(task.id, f"{TRAVEL_SEGMENT}:{spec.index}") for spec in specs]
    stitch_id = mirror_id(task.id, TRAVEL_STITCH) if plan.stitched else None
    structure = travel_structure(task.params, plan)
    for spec, row_id in zip(specs, segment_ids, strict=True):
        depends = segment_ids[spec.index - 1] if spec.index > 0 and plan.stitched else None
        params = {
            "orchestrator_task_id": task.id,
            "orchestrator_run_id": plan.run_id,
            "run_id": plan.run_id,
            "segment_index": spec.index,
            "frames": spec.frames,
            "model_type": plan.mode,
            "prompt": spec.prompt,
        }
        _ensure_row(ctx.store, row_id, TRAVEL_SEGMENT, params, depends, task.project_id)
    if stitch_id is not None:
        stitch_params = {
            "orchestrator_task_id": task.id,
            "run_id": plan.run_id,
            "expected_frames": plan.total_frames,
        }
        _ensure_row(ctx.store, stitch_id, TRAVEL_STITCH, stitch_params, segment_ids[-1], task.project_id)
    return TravelRun(task=task, plan=plan, segment_ids=segment_ids, stitch_id=stitch_id, structure=structure)


class MirrorRowConflict(ValueError):
    """A row with a mirror row's id exists but is not this orchestrator's (ids are predictable, and
    clients may choose task ids): it is never reused."""


def _orchestrator_of(params: dict) -> str | None:
    """The orchestrator a mirror row belongs to (travel rows say `orchestrator_task_id`, the original's
    join rows `orchestrator_task_id_ref`)."""
    return params.get("orchestrator_task_id") or params.get("orchestrator_task_id_ref")


def _ensure_row(
    store: TaskStore, row_id: str, task_type: str, params: dict, depends: str | None, project: str | None
):
    """Create the mirror row, or check that the existing one is this orchestrator's own."""
    try:
        row = store.get(row_id)
    except TaskNotFound:
        store.create(
            NewTask(id=row_id, task_type=task_type, params=params, dependant_on=depends, project_id=project)
        )
        return
    owner, mine = _orchestrator_of(row.params), _orchestrator_of(params)
    if row.task_type != task_type or owner != mine or row.project_id != project:
        logger.warning(
            "orchestrator %s: row %s is a %s of orchestrator %r in project %r; not reusing it",
            mine, row_id, row.task_type, owner, row.project_id,
        )  # fmt: skip
        raise MirrorRowConflict(
            f"task id {row_id} (this run's {task_type} row) is already taken by another task; "
            "resubmit under a new task id"
        )


def _stored_frames(ctx: RunContext, row: Task) -> np.ndarray | None:
    """A completed segment's frames from its stored output, or None when they are gone."""
    if row.status != TaskStatus.COMPLETE or not row.output_location:
        return None
    local = ctx.storage.resolve_local(row.output_location)
    if local is None or not local.is_file():
        return None
    return decode_video(local)[0]


async def execute(ctx: RunContext, run: TravelRun) -> Artifact:
    """Execute the DAG, mirroring each step's status in its row; returns the final video."""
    plan, store = run.plan, ctx.store
    specs = plan_segments(plan)

    def load_inputs() -> tuple[list[np.ndarray], np.ndarray | None, dict[int, np.ndarray], dict[str, bytes]]:
        anchors = [
            load_image(ctx.fetcher.fetch(ref, field=f"anchors[{i}]")) for i, ref in enumerate(plan.anchors)
        ]
        continued = None
        if plan.continue_from_video:
            continued = decode_video(
                ctx.fetcher.fetch(plan.continue_from_video, field="continue_from_video")
            )[0]
        reused = {}
        for spec, row_id in zip(specs, run.segment_ids, strict=True):
            frames = _stored_frames(ctx, store.get(row_id))
            if frames is not None:
                reused[spec.index] = frames
        structure_videos = {
            ref: ctx.fetcher.fetch(ref, field=field).read_bytes()
            for field, ref in structure_references(run.structure)
        }
        return anchors, continued, reused, structure_videos

    anchors, continued, reused, structure_videos = await ctx.blocking(load_inputs)
    if reused:
        logger.info("travel %s: reusing stored segments %s", plan.run_id, sorted(reused))
    # Where the steps go (VACE, or image-to-video on T2V for model_type i2v); resolved from stand-ins.
    step_type = step_task_type(plan)
    model = {"model": plan.model} if plan.model else {}
    step = ctx.step({**STAND_INS[step_type], **model}, task_type=step_type)
    guidance = {**plan.segment_params_extra, **model}  # what the scheduler's CFG check reads

    # Each segment's Ray task is launched from here once the family's scheduler gives it a slot
    # (`ctx.place`), with that pool's handle; clips pass between tasks as object refs.
    pending = [(spec, row_id) for spec, row_id in zip(specs, run.segment_ids, strict=True)
               if spec.index not in reused]  # fmt: skip
    anchors_ref = await ctx.blocking(ray.put, anchors)
    continued_ref = None if continued is None else await ctx.blocking(ray.put, continued)
    control = None
    if run.structure is not None and pending:
        control = control_node.remote(plan, run.structure, structure_videos)
    run.refs = [] if control is None else [control]
    outputs: dict[int, Any] = dict(reused)  # segment index -> its clip's frames (or their object ref)
    records: list[asyncio.Future] = []  # each generated segment's file, saved and its row completed
    pieces = stitch_pieces(plan, None if continued is None else len(continued)) if plan.stitched else []
    encoded: dict[int, ray.ObjectRef] = {}  # piece index -> its MP4, encoding as soon as its clips exist

    def encode_pieces() -> None:
        for piece in pieces:
            if piece.index not in encoded and all(i in outputs for i in piece.segments):
                clips = (outputs[i] for i in piece.segments)
                encoded[piece.index] = stitch_piece_node.remote(
                    plan, piece, anchors_ref, continued_ref, *clips
                )
                run.refs.append(encoded[piece.index])

    async def generate(spec: SegmentSpec, row_id: str, source: Any, placement: StepPlacement) -> None:
        async with placement as target:
            frames, described = segment_node.remote(plan, spec, source, anchors_ref, target, row_id, control)
            run.refs += [frames, described]
            outputs[spec.index] = frames
            encode_pieces()  # the piece waits for the frames in Ray, not here
            await described  # the slot is held while the segment's task runs
        file = segment_file_node.remote(plan, frames, described)
        run.refs.append(file)
        records.append(asyncio.ensure_future(record(row_id, file, target.scheduling)))

    async def record(row_id: str, file: ray.ObjectRef, scheduling: dict | None) -> None:
        result = await file
        if scheduling is not None:  # the segment row's result says which pool ran it, and why
            result["artifact"].metadata["scheduling"] = scheduling
        await ctx.blocking(_record_segment, ctx, plan, row_id, result)

    await ctx.blocking(_start_rows, store, ctx.worker_id, run, specs, reused)
    encode_pieces()  # those of reused segments
    stitch: ray.ObjectRef | None = None
    try:
        if plan.stitched:  # a chain: each segment asks for its slot when the previous one is done
            for spec, row_id in pending:
                for recorded in (r for r in records if r.done()):
                    recorded.result()  # a segment that could not be stored stops the chain here
                if spec.index > 0 and spec.index - 1 not in reused:
                    await ctx.blocking(store.start, row_id, ctx.worker_id)
                source = outputs.get(spec.index - 1, continued_ref) if spec.index > 0 else continued_ref
                await generate(spec, row_id, source, ctx.place(step, row_id, guidance))
            # The stitch joins the pieces while the last segment's file is still being recorded.
            await ctx.blocking(store.start, run.stitch_id, ctx.worker_id)
            stitch = stitch_node.remote(plan, *(encoded[piece.index] for piece in pieces))
            run.refs.append(stitch)
        else:  # independent segments ask at once: a burst the scheduler spreads over its pools
            placements = [ctx.place(step, row_id, guidance) for _, row_id in pending]
            segments = [
                asyncio.ensure_future(
                    generate(spec, row_id, continued_ref if spec.index == 0 else None, placement)
                )
                for (spec, row_id), placement in zip(pending, placements, strict=True)
            ]
            try:
                await asyncio.gather(*segments)
            except BaseException:
                for segment in segments:  # one failed: the others record nothing and give their slots back
                    segment.cancel()
                raise
            finally:
                for placement in placements:  # those never entered (a sibling failed first)
                    placement.withdraw()
        await asyncio.gather(*records)
    except BaseException:
        if stitch is not None:
            ray.cancel(stitch)
        # The segments already generated keep their files and rows (a resumed run reuses them): their
        # records finish, within a deadline, before the run's unfinished rows are marked.
        if records:
            await asyncio.wait(records, timeout=RECORD_GRACE_S)
            for recorded in records:  # their own failures are logged: the run's error is the one raised
                if recorded.done() and not recorded.cancelled() and recorded.exception() is not None:
                    logger.warning(
                        "travel %s: a segment's record failed: %s", plan.run_id, recorded.exception()
                    )
        raise
    if stitch is None:
        return await ctx.blocking(_last_clip, ctx, run)
    artifact: Artifact = await stitch
    run.output = artifact
    if run.structure is not None:
        artifact.metadata["structure_type"] = run.structure.structure_type
    if plan.debug:
        logger.info("[FRAME_DEBUG] travel %s final: expected %d frames, got %d",
                    plan.run_id, plan.total_frames, artifact.metadata["frames"])  # fmt: skip
    return artifact


def _last_clip(ctx: RunContext, run: TravelRun) -> Artifact:
    """The output of an unstitched run: its last segment's clip, as the original's orchestrator completes
    with the last segment's output when it made no stitch task; every segment's output is listed."""
    plan = run.plan
    rows = [ctx.store.get(row_id) for row_id in run.segment_ids]
    local = ctx.storage.resolve_local(rows[-1].output_location) if rows[-1].output_location else None
    if local is None or not local.is_file():
        raise StepFailed(f"the last segment's output ({rows[-1].output_location}) is gone")
    data = local.read_bytes()
    frames = decode_video(data)[0]
    return Artifact(
        data=data,
        filename=segment_filename(plan.run_id, plan.num_segments - 1),
        media_type="video/mp4",
        metadata={
            "frames": int(frames.shape[0]),
            "expected_frames": plan.total_frames,
            "fps": plan.fps,
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
            "segments": plan.num_segments,
            "chain_segments": plan.chain_segments,
            "model_type": plan.mode,
            "stitched": False,
            "segment_outputs": [row.output_location for row in rows],
            "ignored_params": plan.ignored_params,
        },
    )


def _start_rows(store: TaskStore, worker_id: str, run: TravelRun, specs: list, reused: dict) -> None:
    """Mark the segments about to run `In Progress`: all of them when independent, the first in a chain."""
    for spec, row_id in zip(specs, run.segment_ids, strict=True):
        if spec.index in reused:
            continue
        store.start(row_id, worker_id)
        if run.plan.stitched:
            break


def _record_segment(ctx: RunContext, plan: TravelPlan, row_id: str, result: dict) -> None:
    saved = ctx.storage.save(row_id, result["artifact"])
    # When the replica generated it, for anyone reading the row (and to show independent segments overlapping).
    metadata = result["artifact"].metadata
    ran = f"generated from {_iso(metadata['denoise_started'])} to {_iso(metadata['denoise_finished'])}"
    ctx.store.set_progress(row_id, ctx.worker_id, 1.0, ran)
    if "guide" in result:
        base = segment_filename(plan.run_id, result["index"]).removesuffix("_output.mp4")
        ctx.storage.save_bytes(row_id, result["guide"], f"{base}_guide.mp4", "video/mp4")
        ctx.storage.save_bytes(row_id, result["mask"], f"{base}_mask.mp4", "video/mp4")
    # The segment's first frame, as the original worker sends with every video it completes (the report
    # then carries thumbnail_url / thumbnail_error like a dispatched task's result).
    thumbnail_url = save_thumbnail(ctx.storage, row_id, result["artifact"])
    report = task_result(None, result["artifact"], saved.uploaded)  # the segment's own seed, steps, timings
    ctx.store.complete_idempotent(
        row_id, saved.output_location, worker_id=ctx.worker_id, result=report, thumbnail_url=thumbnail_url
    )
    if plan.debug:
        logger.info(
            "[SEGMENT_DEBUG] %s segment %d: %d frames", plan.run_id, result["index"], result["frames"]
        )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def finish(ctx: RunContext, run: TravelRun, output_location: str) -> None:
    """The stitch row completes with the final video and its own thumbnail (in
    `params.full_orchestrator_payload.thumbnail_url`, the original's rule); intermediate files (the
    segments' clips and thumbnails) go unless debug / skip_cleanup. Unstitched, the segments' clips are
    the run's outputs: they stay."""
    if run.stitch_id is None:
        return
    thumbnail_url = save_row_thumbnail(ctx.storage, run.stitch_id, run.output)
    ctx.store.complete_idempotent(
        run.stitch_id, output_location, worker_id=ctx.worker_id, thumbnail_url=thumbnail_url
    )
    if run.plan.debug or run.plan.skip_cleanup:
        return
    for row_id in run.segment_ids:
        folder = ctx.storage.root / row_id
        for path in folder.glob("*") if folder.is_dir() else []:
            path.unlink(missing_ok=True)


def abort(ctx: RunContext, run: TravelRun, message: str, cancelled: bool) -> None:
    """A failed or cancelled run: its unfinished rows say so (their dependants fail naming them)."""
    for row_id in run.row_ids:
        row = ctx.store.get(row_id)
        if row.status.is_final:
            continue
        if cancelled:
            ctx.store.cancel(row_id)
        else:
            ctx.store.fail(row_id, message)
