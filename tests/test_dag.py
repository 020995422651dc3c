"""Multi-step tasks end to end: travel between images as a Ray DAG, utilities, resume after a crash.

A real local Ray cluster with two VACE replicas (fake GPUs) and tiny models.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from ray import serve

from db.store import open_store
from deployments.app import build_app
from hwgp_testing import running_app, wait_final
from Wan2GP.video import decode_video, encode_mp4, encode_png, load_image, probe_video

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("dag")
    inputs = root / "inputs"
    inputs.mkdir()
    for i, colour in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250), (250, 250, 20)]):
        image = np.zeros((48, 64, 3), dtype=np.uint8)
        image[:] = colour
        image[10:30, 10 + 8 * i : 30 + 8 * i] = 255  # a square that moves between anchors
        (inputs / f"anchor{i}.png").write_bytes(encode_png(image))
    # A full-body figure on a plain background, for the pose-driven tasks.
    person = np.full((128, 128, 3), (90, 110, 130), np.uint8)
    light = (240, 230, 220)
    cv2.circle(person, (64, 20), 8, light, -1)
    cv2.line(person, (64, 31), (64, 70), light, 6)
    for hand in ((100, 35), (28, 50)):
        cv2.line(person, (64, 35), hand, light, 4)
    for foot in ((80, 114), (48, 114)):
        cv2.line(person, (64, 70), foot, light, 5)
    (inputs / "person.png").write_bytes(encode_png(person))
    (inputs / "empty.png").write_bytes(encode_png(np.full((128, 128, 3), (90, 110, 130), np.uint8)))
    ramp = np.linspace(0, 255, 9).astype(np.uint8)[:, None, None, None] * np.ones((9, 48, 64, 3), np.uint8)
    (inputs / "clip_a.mp4").write_bytes(encode_mp4(ramp, fps=16))
    (inputs / "clip_b.mp4").write_bytes(encode_mp4(255 - ramp, fps=16))

    small = {"num_gpus": 0.25, "num_cpus": 0.05}
    config = {
        "db": f"sqlite:///{root / 'tasks.db'}",
        "storage": {"root": str(root / "public" / "files")},
        "input_dirs": [str(inputs)],
        "models": "tiny",
        "deployments": {"T2V": small, "VACE": {**small, "replicas": 2, "preload": True}, "Flux": small},
        # A short stale timeout: segment rows must be heartbeated with their orchestrator.
        "ingress": {
            "heartbeat_interval_s": 0.5,
            "poll_interval_s": 0.2,
            "shutdown_grace_s": 0.5,
            "stale_after_s": 3,
        },
    }
    with running_app(config) as client:
        yield {"client": client, "db": config["db"], "inputs": inputs, "files": root / "public" / "files",
               "config": config}  # fmt: skip


def travel_params(service: dict, anchors: int, **extra) -> dict:
    return {
        "images": [str(service["inputs"] / f"anchor{i}.png") for i in range(anchors)],
        "prompt": "a square travels",
        "frames": 13,
        "overlap": 4,
        "resolution": "64x48",
        "num_inference_steps": 2,
        "seed": 3,
        **extra,
    }


def rows_of(service: dict, orchestrator_id: str) -> tuple[list, object]:
    with open_store(service["db"]) as store:
        tasks = store.list(limit=1000)
    mine = [t for t in tasks if t.params.get("orchestrator_task_id") == orchestrator_id]
    segments = sorted(
        (t for t in mine if t.task_type == "travel_segment"), key=lambda t: t.params["segment_index"]
    )
    stitch = next((t for t in mine if t.task_type == "travel_stitch"), None)  # None until prepared
    return segments, stitch


def test_three_anchor_chained_travel(service: dict):
    client = service["client"]
    response = client.post("/tasks", json={"task_type": "travel_orchestrator",
                                           "params": travel_params(service, 3, run_id="run3")})  # fmt: skip
    assert response.status_code == 201, response.text
    orchestrator = wait_final(client, response.json()["id"])
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    assert orchestrator["output_location"].endswith("/run3_final.mp4")

    final = client.get(f"/tasks/{orchestrator['id']}/output").content
    assert probe_video(final)["frames"] == 13 + 13 - 4  # Σ segment frames − Σ overlaps
    segments, stitch = rows_of(service, orchestrator["id"])
    assert [s.status.value for s in segments] == [
        "Complete",
        "Complete",
    ] and stitch.status.value == "Complete"
    assert segments[0].dependant_on is None and segments[1].dependant_on == segments[0].id
    assert stitch.dependant_on == segments[1].id
    assert stitch.output_location == orchestrator["output_location"]
    assert [s.output_location.rsplit("/", 1)[1] for s in segments] == [
        "run3_seg00_output.mp4",
        "run3_seg01_output.mp4",
    ]
    # Each segment row records what its generation reported; the orchestrator's result is the final video's.
    for segment in segments:
        timings = segment.result["timings"]
        assert segment.result["steps"] == 2 and segment.result["model"] and "denoise" in timings
        # The segment's own stages: its guide, and the step's round trip, which holds the replica's.
        assert timings["guide"] >= 0 and timings["step_call"] >= timings["denoise"] + timings["decode"]
    assert orchestrator["result"]["output"]["bytes"] == len(final)
    # Thumbnails of the rows the run completes itself, where the original's complete-task puts them: the
    # stitch row's first frame under params.full_orchestrator_payload (with accelerated false), stored
    # under the row's id; each segment's at the top level (its file goes with the segment's clip).
    holder = stitch.params["full_orchestrator_payload"]
    assert holder["accelerated"] is False and stitch.params["expected_frames"] == 22
    assert holder["thumbnail_url"].endswith(f"/{stitch.id}/{thumb_name(stitch.id)}")
    thumb = load_image((service["files"] / stitch.id / thumb_name(stitch.id)).read_bytes())
    first = decode_video(final)[0][0]
    assert thumb.shape == first.shape == (48, 64, 3)
    assert np.abs(thumb.astype(float) - first).mean() < 8
    for segment in segments:
        location = segment.params["thumbnail_url"]
        assert location.endswith(f"/{segment.id}/{thumb_name(segment.id)}")
        assert segment.result["thumbnail_url"] == location


def thumb_name(task_id: str) -> str:
    return f"thumb_{task_id[:8]}.jpg"


def test_a_chain_continuing_a_video_is_stitched_in_pieces_with_its_fades(service: dict):
    """The continued video goes with segment 0's piece, the fades land on the whole video's first and last
    frames, and the pieces join into one video with every frame in time."""
    client = service["client"]
    params = travel_params(service, 2, run_id="cont", continue_from_video=str(service["inputs"] / "clip_a.mp4"),
                           continue_overlap=4, fade_in=3, fade_out=5)  # fmt: skip
    response = client.post("/tasks", json={"task_type": "travel_orchestrator", "params": params})
    assert response.status_code == 201, response.text
    orchestrator = wait_final(client, response.json()["id"])
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    final = client.get(f"/tasks/{orchestrator['id']}/output").content
    frames, fps = decode_video(final)
    assert len(frames) == 9 - 4 + 13 + 13 - 4 and fps == 16  # the continued video's 9, less its overlap
    assert probe_video(final) == {"frames": 27, "fps": 16.0, "width": 64, "height": 48}
    assert frames[0].mean() < 6 and frames[-1].mean() < 6  # faded in from black and out to black
    ramp = decode_video((service["inputs"] / "clip_a.mp4").read_bytes())[0]
    # After the fade-in, before the cross-fade into segment 0: the continued video's own frames.
    assert np.abs(frames[3:5].astype(float) - ramp[3:5]).mean() < 6


def test_original_payload_form(service: dict):
    client = service["client"]
    details = {
        "run_id": "orig",
        "input_image_paths_resolved": [str(service["inputs"] / f"anchor{i}.png") for i in range(3)],
        "num_new_segments_to_generate": 2,
        "base_prompts_expanded": ["first leg", "second leg"],
        "negative_prompts_expanded": ["", ""],
        "segment_frames_expanded": [11, 15],  # quantized to 9 and 13
        "frame_overlap_expanded": [5],  # made even: 4
        "parsed_resolution_wh": "64x48",
        "model_name": "tiny-vace",
        "seed_base": 11,
        "debug_mode_enabled": True,
        "num_inference_steps": 2,
    }
    response = client.post("/tasks", json={"task_type": "travel_orchestrator",
                                           "params": {"orchestrator_details": details}})  # fmt: skip
    assert response.status_code == 201, response.text
    orchestrator = wait_final(client, response.json()["id"])
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    final = client.get(f"/tasks/{orchestrator['id']}/output").content
    # the original's newest rule ("context" overlaps, its form's default): segment 1 generates 13 + 4
    # frames, the first 4 from segment 0, so the video has Σ segment frames
    assert probe_video(final)["frames"] == 9 + 13
    segments, _ = rows_of(service, orchestrator["id"])
    assert [probe_video(service["files"] / s.id / f"orig_seg{i:02d}_output.mp4")["frames"]
            for i, s in enumerate(segments)] == [9, 17]  # fmt: skip
    # debug mode keeps the guide and mask next to each segment's output
    names = sorted(p.name for p in (service["files"] / segments[0].id).iterdir())
    assert names == ["orig_seg00_guide.mp4", "orig_seg00_mask.mp4", "orig_seg00_output.mp4",
                     thumb_name(segments[0].id)]  # fmt: skip


def test_independent_segments_run_in_parallel(service: dict):
    client = service["client"]
    params = travel_params(service, 3, run_id="parallel", chain_segments=False, num_inference_steps=200,
                           resolution="256x192", frames=17)  # fmt: skip
    response = client.post("/tasks", json={"task_type": "travel_orchestrator", "params": params})
    orchestrator = wait_final(client, response.json()["id"])
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    # not chained: no stitch (as in the original); the output is the last segment's clip
    assert probe_video(client.get(f"/tasks/{orchestrator['id']}/output").content)["frames"] == 17
    segments, stitch = rows_of(service, orchestrator["id"])
    assert all(s.dependant_on is None for s in segments) and stitch is None
    assert orchestrator["result"]["segment_outputs"] == [s.output_location for s in segments]
    spans = []
    for segment in segments:
        _, _, start, _, end = segment.progress_message.split()  # "generated from START to END"
        spans.append((datetime.fromisoformat(start), datetime.fromisoformat(end)))
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end, f"segments did not overlap in time: {spans}"


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"images": [], "prompt": "x", "frames": 13, "resolution": "64x48"}, "images"),
        # one image makes one segment (the original's single image journey), not two
        (
            {
                "images": ["anchor0.png"],
                "prompt": "x",
                "frames": 13,
                "resolution": "64x48",
                "num_segments": 2,
            },
            "num_segments",
        ),
        (
            {"images": ["anchor0.png", "anchor1.png"], "prompt": "x", "frames": 13, "resolution": "abc"},
            "resolution",
        ),
        (
            {"images": ["anchor0.png", "missing.png"], "prompt": "x", "frames": 13, "resolution": "64x48"},
            "missing.png",
        ),
        (
            {
                "images": ["anchor0.png", "anchor1.png"],
                "prompts": ["a", "b", "c"],
                "frames": 13,
                "resolution": "64x48",
            },
            "prompts",
        ),
    ],
)
def test_bad_travel_payloads_are_rejected(service: dict, params: dict, needle: str):
    params = {**params, "images": [str(service["inputs"] / p) for p in params["images"]]}
    response = service["client"].post("/tasks", json={"task_type": "travel_orchestrator", "params": params})
    assert response.status_code == 422 and needle in response.text, response.text


def test_different_perspective(service: dict):
    client = service["client"]
    params = {"input_image_path": str(service["inputs"] / "person.png"), "prompt": "the same person, mirrored",
              "target_pose": "mirror", "resolution": "128x128", "output_video_frames": 9, "num_inference_steps": 2,
              "run_id": "dp1"}  # fmt: skip
    response = client.post(
        "/tasks", json={"task_type": "different_perspective_orchestrator", "params": params}
    )
    assert response.status_code == 201, response.text
    task = wait_final(client, response.json()["id"])
    assert task["status"] == "Complete", task["error_message"]
    assert task["output_location"].endswith("/dp1_final.png")
    assert load_image(client.get(f"/tasks/{task['id']}/output").content).shape == (128, 128, 3)
    with open_store(service["db"]) as store:
        [final] = [
            t for t in store.list(task_type="dp_final_gen") if t.params["orchestrator_task_id"] == task["id"]
        ]
    assert final.status.value == "Complete" and final.output_location == task["output_location"]
    # its own thumbnail: a third of the final frame, as the original makes for an image output
    assert final.params["thumbnail_url"].endswith(f"/{final.id}/{thumb_name(final.id)}")
    assert load_image((service["files"] / final.id / thumb_name(final.id)).read_bytes()).shape == (43, 43, 3)

    blank = {**params, "input_image_path": str(service["inputs"] / "empty.png"), "target_pose": "yaw:60"}
    no_person = client.post(
        "/tasks", json={"task_type": "different_perspective_orchestrator", "params": blank}
    )
    failed = wait_final(client, no_person.json()["id"])
    assert failed["status"] == "Failed" and "no person found" in failed["error_message"]
    bad = client.post("/tasks", json={"task_type": "different_perspective_orchestrator",
                                      "params": {**params, "target_pose": "sideways"}})  # fmt: skip
    assert bad.status_code == 422 and "target_pose" in bad.text


def _utility(service: dict, task_type: str, params: dict, **fields) -> dict:
    response = service["client"].post("/tasks", json={"task_type": task_type, "params": params, **fields})
    assert response.status_code == 201, response.text
    return wait_final(service["client"], response.json()["id"])


def test_utility_tasks(service: dict):
    client, inputs = service["client"], service["inputs"]
    pose = _utility(service, "generate_openpose", {"input_image_path": str(inputs / "anchor0.png")})
    assert pose["status"] == "Complete", pose["error_message"]
    assert load_image(client.get(f"/tasks/{pose['id']}/output").content).shape == (48, 64, 3)

    between = _utility(service, "rife_interpolate_images", {"input_image_path1": str(inputs / "anchor0.png"),
                                                            "input_image_path2": str(inputs / "anchor1.png"),
                                                            "frames": 5})  # fmt: skip
    assert between["status"] == "Complete", between["error_message"]
    assert probe_video(client.get(f"/tasks/{between['id']}/output").content)["frames"] == 5

    joined = _utility(service, "join_clips", {"clips": [str(inputs / "clip_a.mp4"), str(inputs / "clip_b.mp4")],
                                              "overlap": 4})  # fmt: skip
    assert joined["status"] == "Complete", joined["error_message"]
    assert probe_video(client.get(f"/tasks/{joined['id']}/output").content)["frames"] == 9 + 9 - 4


def test_extract_frame_from_a_predecessor_task(service: dict):
    client = service["client"]
    video = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "source", "video_length": 9,
                                        "resolution": "64x48", "num_inference_steps": 2}}).json()  # fmt: skip
    frame = _utility(service, "extract_frame", {"frame_index": 4, "input_video_task_id": video["id"]},
                     dependant_on=video["id"])  # fmt: skip
    assert frame["status"] == "Complete", frame["error_message"]
    assert load_image(client.get(f"/tasks/{frame['id']}/output").content).shape == (48, 64, 3)

    out_of_range = _utility(service, "extract_frame", {"frame_index": 50, "input_video_task_id": video["id"]})
    assert out_of_range["status"] == "Failed"
    assert "frame_index 50 is out of range" in out_of_range["error_message"]


@pytest.mark.parametrize(
    ("task_type", "params", "needle"),
    [
        ("rife_interpolate_images", {"input_image_path1": "missing.png", "input_image_path2": "anchor0.png"},
         "input_image_path1"),
        ("extract_frame", {"input_video_path": "clip_a.mp4"}, "frame_index"),
        ("generate_openpose", {}, "input_image_path"),
        ("join_clips", {"clips": ["clip_a.mp4"]}, "clips"),
    ],
)  # fmt: skip
def test_bad_utility_input_is_rejected(service: dict, task_type: str, params: dict, needle: str):
    params = {k: ([str(service["inputs"] / c) for c in v] if isinstance(v, list) else str(service["inputs"] / v))
              if k != "frame_index" else v for k, v in params.items()}  # fmt: skip
    response = service["client"].post("/tasks", json={"task_type": task_type, "params": params})
    assert response.status_code == 422 and needle in response.text, response.text


def test_a_chain_hands_the_next_segment_exact_frames_and_makes_files_aside(service: dict):
    """The segment node's two returns: the clip's frames as the replica decoded them (the next segment's
    guide and the stitch take those, never a re-decoded MP4) and a small description that is all the
    orchestrator pulls; the segment's MP4 is made from both by its own node, while the chain goes on."""
    import ray

    from dag.orchestrations import StepTarget
    from dag.travel import segment_file_node, segment_node
    from dag.travel_plan import parse_travel, plan_segments

    params = travel_params(service, 3, run_id="aside")
    plan = parse_travel(params, default_run_id="aside")
    specs = plan_segments(plan)
    anchors = [load_image(Path(path).read_bytes()) for path in params["images"]]
    handle = serve.get_deployment_handle("VACE", app_name="hwgp")
    target = StepTarget(task_type="vace", handle=handle, model_id="tiny-vace")

    frames_ref, described_ref = segment_node.remote(plan, specs[0], None, anchors, target, "aside-0")
    described = ray.get(described_ref, timeout=120)
    frames = ray.get(frames_ref, timeout=30)
    assert frames.dtype == np.uint8 and frames.shape == (13, 48, 64, 3)
    # What the orchestrator awaits carries no frames: only the index, the count and the replica's metadata.
    assert described["index"] == 0 and described["frames"] == 13 and "artifact" not in described
    assert not any(isinstance(value, np.ndarray) for value in described.values())
    assert described["metadata"]["denoise_finished"] >= described["metadata"]["denoise_started"]

    # The next segment takes the clip by reference, straight from the node.
    next_frames, next_described = segment_node.remote(plan, specs[1], frames_ref, anchors, target, "aside-1")

    # The first segment's file, made aside from the same two returns: its MP4 decodes to those frames.
    recorded = ray.get(segment_file_node.remote(plan, frames_ref, described_ref), timeout=60)
    artifact = recorded["artifact"]
    assert artifact.filename == "aside_seg00_output.mp4" and artifact.media_type == "video/mp4"
    decoded = decode_video(artifact.data)[0]
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames).mean() < 8  # H.264 of the same frames
    assert not np.array_equal(decoded, frames)  # so the chain's frames are the replica's, not the file's
    assert "encode_file" in artifact.metadata["timings"] and "denoise" in artifact.metadata["timings"]
    assert ray.get(next_described, timeout=120)["index"] == 1
    assert ray.get(next_frames, timeout=30).shape == (13, 48, 64, 3)


def test_resume_after_the_service_dies_reuses_finished_segments(service: dict):
    """Runs last: it redeploys the application."""
    client = service["client"]
    params = travel_params(
        service, 4, run_id="resume", num_inference_steps=30, resolution="128x96", frames=17
    )
    orchestrator_id = client.post(
        "/tasks", json={"task_type": "travel_orchestrator", "params": params}
    ).json()["id"]
    deadline = time.monotonic() + 300
    while True:
        segments, _ = rows_of(service, orchestrator_id)
        if segments and segments[0].status.value == "Complete":
            break
        assert time.monotonic() < deadline, "segment 0 never completed"
        time.sleep(0.1)
    first_done = segments[0]
    serve.delete("hwgp")  # the cluster loses the application mid-travel
    with open_store(service["db"]) as store:
        assert store.get(orchestrator_id).status.value != "Complete"
    serve.run(build_app(service["config"]), name="hwgp", route_prefix="/")

    orchestrator = wait_final(client, orchestrator_id)
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    segments, stitch = rows_of(service, orchestrator_id)
    # segment 0 was not generated again: same row, same attempt, same finish time
    assert (
        segments[0].attempts == 1
        and segments[0].generation_processed_at == first_done.generation_processed_at
    )
    assert all(s.status.value == "Complete" for s in segments) and stitch.status.value == "Complete"
    final = client.get(f"/tasks/{orchestrator_id}/output").content
    assert probe_video(final)["frames"] == 3 * 17 - 2 * 4
