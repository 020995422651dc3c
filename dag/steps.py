"""What every orchestration step shares: one generation on a family deployment, from inside a Ray task."""

from __future__ import annotations

import time
from typing import Any

from Wan2GP.artifact import Artifact, Rendered

# Stand-in params by step type, for resolving a step's model and deployment before its real inputs exist
# (RunContext.step): the steps make their own.
STAND_INS: dict[str, dict[str, Any]] = {
    "vace": {"video_guide": "guide"},
    "flf2v": {"image_start": "image", "image_end": "image"},
    "i2v": {"image_start": "image"},
}


class StepFailed(RuntimeError):
    """A step's generation failed for a reason in its inputs (reported as is, not retried)."""


def render_step(
    handle: Any,
    model_id: str,
    task_type: str,
    params: dict[str, Any],
    task_id: str,
    lora_files: dict[str, Any] | None = None,
) -> Rendered | Artifact:
    """Run one task on a family deployment and return its frames (blocking: for Ray tasks): a multi-GPU
    replica is asked for them too (`encode=False`) rather than the file its ranks would encode in pieces;
    an `Artifact` comes back only from a replica that encoded anyway. Its metadata gains `denoise_started`
    / `denoise_finished` (epoch seconds): when the replica really generated, as opposed to waiting for a
    free replica or loading the model.
    `lora_files`: the LoRAs fetched by URL that `params` name by content name (`StepTarget.lora_files`).
    """
    options = handle.options(stream=True, multiplexed_model_id=model_id)
    stream = options.generate.remote(task_type, params, task_id, lora_files, encode=False)
    started = None
    try:
        for event in stream:
            if event["event"] == "progress" and started is None:
                started = time.time()
            elif event["event"] == "done":
                finished = time.time()
                output = event.get("rendered") or event["artifact"]
                output.metadata.update(denoise_started=started or finished, denoise_finished=finished)
                return output
            elif event["event"] == "error":
                raise StepFailed(event["message"])
    except BaseException:
        stream.cancel()  # a cancelled or failed run must not leave the replica generating
        raise
    raise StepFailed(f"{task_type} step {task_id} ended without an output")


def generate_step(
    handle: Any,
    model_id: str,
    task_type: str,
    params: dict[str, Any],
    task_id: str,
    lora_files: dict[str, Any] | None = None,
) -> Artifact:
    """:func:`render_step`, encoded: frames are encoded here, in the calling Ray task's CPU, so an
    orchestration's steps keep the `Artifact` contract (the step's stored MP4)."""
    output = render_step(handle, model_id, task_type, params, task_id, lora_files)
    return output.encode() if isinstance(output, Rendered) else output
