"""What every orchestration step shares: one generation on a family deployment, from inside a Ray task."""

from __future__ import annotations

import time
from typing import Any

from Wan2GP.artifact import Artifact

# Stand-in params by step type, for resolving a step's model and deployment before its real inputs exist
# (RunContext.step): the steps make their own.
STAND_INS: dict[str, dict[str, Any]] = {
    "vace": {"video_guide": "guide"},
    "flf2v": {"image_start": "image", "image_end": "image"},
    "i2v": {"image_start": "image"},
}


class StepFailed(RuntimeError):
    """A step's generation failed for a reason in its inputs (reported as is, not retried)."""


def generate_step(
    handle: Any,
    model_id: str,
    task_type: str,
    params: dict[str, Any],
    task_id: str,
    lora_files: dict[str, Any] | None = None,
) -> Artifact:
    """Run one task on a family deployment and return its artifact (blocking: for Ray tasks).

    The replica hands back frames and takes its next request; they are encoded here, in the calling Ray
    task's CPU, so an orchestration's steps keep the `Artifact` contract (the segment's stored MP4, which the
    stitch decodes as the original does). The artifact's metadata gains `denoise_started` /
    `denoise_finished` (epoch seconds): when the replica really generated, as opposed to waiting for a free replica or loading the model.
    `lora_files`: the LoRAs fetched by URL that `params` name by content name (`StepTarget.lora_files`).
    """
    options = handle.options(stream=True, multiplexed_model_id=model_id)
    stream = options.generate.remote(task_type, params, task_id, lora_files)
    started = None
    try:
        for event in stream:
            if event["event"] == "progress" and started is None:
                started = time.time()
            elif event["event"] == "done":
                finished = time.time()
                rendered = event.get("rendered")
                artifact = rendered.encode() if rendered is not None else event["artifact"]
                artifact.metadata.update(denoise_started=started or finished, denoise_finished=finished)
                return artifact
            elif event["event"] == "error":
                raise StepFailed(event["message"])
    except BaseException:
        stream.cancel()  # a cancelled or failed run must not leave the replica generating
        raise
    raise StepFailed(f"{task_type} step {task_id} ended without an output")
