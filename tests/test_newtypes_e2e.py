"""The original's newer task types end to end over HTTP (issue 20): joins with VACE bridges, video editing,
one travel segment on its own, structure guidance in travel.

A real local Ray cluster (fake GPUs), the application with tiny random-weight models, real SQLite and
real ffmpeg. Random weights draw noise, so the checks are on what the plans decide: frame counts, the
frames kept from the inputs, file names, rows and their links, and what went into the generations.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from dag.travel import mirror_id
from db.models import NewTask
from db.store import open_store
from hwgp_testing import running_app, wait_final
from storage import OutputStorage, StorageConfig
from Wan2GP.video import decode_video, encode_mp4, encode_png, load_image, probe_video

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 64, 48


def smooth_clip(frames: int, level: int) -> np.ndarray:
    """A slowly brightening flat clip: survives H.264 round trips within a few levels."""
    return np.stack([np.full((HEIGHT, WIDTH, 3), level + 2 * i, np.uint8) for i in range(frames)])


def levels(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("newtypes")
    inputs = root / "inputs"
    inputs.mkdir()
    clips = {"a": smooth_clip(12, 40), "b": smooth_clip(12, 160), "c": smooth_clip(12, 100),
             "long": smooth_clip(30, 60)}  # fmt: skip
    for name, frames in clips.items():
        (inputs / f"{name}.mp4").write_bytes(encode_mp4(frames, fps=16))
    for i, colour in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250)]):
        image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[:] = colour
        (inputs / f"anchor{i}.png").write_bytes(encode_png(image))
    bar = np.zeros((30, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(30):
        bar[t, 12:36, 2 + t : 14 + t] = 230  # a bar moving right: canny edges along its sides
    (inputs / "bar.mp4").write_bytes(encode_mp4(bar, fps=16))

    small = {"num_gpus": 0.25, "num_cpus": 0.05}
    config = {
        "db": f"sqlite:///{root / 'tasks.db'}",
        "storage": {"root": str(root / "public" / "files")},
        "input_dirs": [str(inputs)],
        "models": "tiny",
        "deployments": {"T2V": small, "VACE": small},
        "ingress": {
            "heartbeat_interval_s": 0.5,
            "poll_interval_s": 0.2,
            "shutdown_grace_s": 0.5,
        },
    }
    with running_app(config) as client:
        yield {"client": client, "db": config["db"], "inputs": inputs, "files": root / "public" / "files",
               "clips": clips}  # fmt: skip


def post(service: dict, task_type: str, params: dict) -> dict:
    response = service["client"].post("/tasks", json={"task_type": task_type, "params": params})
    assert response.status_code == 201, response.text
    task = wait_final(service["client"], response.json()["id"])
    assert task["status"] == "Complete", task["error_message"]
    return task


def output_frames(service: dict, task: dict) -> np.ndarray:
    return decode_video(service["client"].get(f"/tasks/{task['id']}/output").content)[0]


def rows_of(service: dict, orchestrator_id: str, task_type: str) -> list:
    with open_store(service["db"]) as store:
        rows = [t for t in store.list(task_type=task_type, limit=1000)
                if t.params.get("orchestrator_task_id_ref") == orchestrator_id]  # fmt: skip
    return sorted(rows, key=lambda t: t.params["join_index"])


def path(service: dict, name: str) -> str:
    return str(service["inputs"] / name)


JOIN = {
    "context_frame_count": 2,
    "gap_frame_count": 6,
    "num_inference_steps": 2,
    "seed": 1,
    "prompt": "blend",
}


def test_join_clips_segment_bridges_two_videos(service: dict):
    a, b = service["clips"]["a"], service["clips"]["b"]
    params = {
        **JOIN,
        "starting_video_path": path(service, "a.mp4"),
        "ending_video_path": path(service, "b.mp4"),
    }
    task = post(service, "join_clips_segment", params)
    assert task["output_location"].endswith(f"/{task['id']}_joined.mp4")
    frames = output_frames(service, task)
    # 2 + 6 + 2 = 10 bridge frames -> 9 (4n+1, the gap gives one): A + B + 5 generated frames
    assert frames.shape == (12 + 12 + 5, HEIGHT, WIDTH, 3)
    out = levels(frames)
    assert np.abs(out[:10] - levels(a)[:10]).max() < 3  # A kept before its context
    assert np.abs(out[-10:] - levels(b)[-10:]).max() < 3  # B kept after its context
    # the first-frame thumbnail beside the output, named as the original names it
    thumb = load_image((service["files"] / task["id"] / f"thumb_{task['id'][:8]}.jpg").read_bytes())
    assert thumb.shape == (HEIGHT, WIDTH, 3) and abs(float(thumb.mean()) - out[0]) < 3


def test_join_clips_orchestrator_chains_joins_in_mirror_rows(service: dict):
    clips = [{"url": path(service, f"{n}.mp4"), "name": n} for n in "abc"]
    details = {
        **JOIN,
        "run_id": "joinrun",
        "clip_list": clips,
        "per_join_settings": [{}, {"prompt": "second"}],
    }
    task = post(service, "join_clips_orchestrator", {"orchestrator_details": details})
    frames = output_frames(service, task)
    assert len(frames) == (12 + 12 + 5) + 12 + 5  # join 1 joins join 0's output with clip c
    out, c = levels(frames), service["clips"]["c"]
    assert np.abs(out[-10:] - levels(c)[-10:]).max() < 3

    rows = rows_of(service, task["id"], "join_clips_segment")
    assert [r.status.value for r in rows] == ["Complete", "Complete"]
    assert rows[0].dependant_on == task["id"] and rows[1].dependant_on == rows[0].id
    assert rows[0].params["starting_video_path"] == clips[0]["url"]
    assert rows[1].params["starting_video_path"] is None and rows[1].params["prompt"] == "second"
    assert rows[0].output_location.endswith(f"/{rows[0].id}_joined.mp4")
    assert rows[1].output_location == task["output_location"]  # the last join's file is the run's output
    first = decode_video(service["client"].get(f"/tasks/{rows[0].id}/output").content)[0]
    assert len(first) == 12 + 12 + 5
    # each join row's first-frame thumbnail, stored under its id and recorded in its params (top level)
    for row, video in ((rows[0], first), (rows[1], frames)):
        name = f"thumb_{row.id[:8]}.jpg"
        assert row.params["thumbnail_url"].endswith(f"/{row.id}/{name}")
        thumb = load_image((service["files"] / row.id / name).read_bytes())
        assert thumb.shape == (HEIGHT, WIDTH, 3) and abs(float(thumb.mean()) - levels(video)[0]) < 3


def test_join_orchestrator_loop_first_clip(service: dict):
    details = {**JOIN, "run_id": "loop", "clip_list": [{"url": path(service, "a.mp4"), "name": "a"}],
               "loop_first_clip": True}  # fmt: skip
    task = post(service, "join_clips_orchestrator", {"orchestrator_details": details})
    frames = output_frames(service, task)
    assert len(frames) == 12 + 12 + 5
    out, a = levels(frames), levels(service["clips"]["a"])
    assert np.abs(out[:10] - a[:10]).max() < 3 and np.abs(out[-10:] - a[::-1][-10:]).max() < 3
    [row] = rows_of(service, task["id"], "join_clips_segment")
    assert row.params["ending_video_path"].endswith(f"/{task['id']}/a_reversed.mp4")


@pytest.mark.parametrize(
    ("task_type", "params", "needle"),
    [
        ("join_clips_segment", {"starting_video_path": "a.mp4"}, "ending_video_path"),
        ("join_clips_segment", {"starting_video_path": "a.mp4", "ending_video_path": "missing.mp4"},
         "missing.mp4"),
        ("join_clips_orchestrator", {"orchestrator_details": {"clip_list": [{"url": "a.mp4"}]}}, "clip_list"),
        ("inpaint_frames", {"video_path": "a.mp4", "inpaint_start_frame": 5, "inpaint_end_frame": 3},
         "inpaint_end_frame"),
        ("edit_video_orchestrator", {"orchestrator_details": {"source_video_url": "long.mp4",
                                                              "portions_to_regenerate": []}},
         "portions_to_regenerate"),
        ("individual_travel_segment", {"orchestrator_details": {"input_image_paths_resolved": ["anchor0.png",
         "anchor1.png"], "parsed_resolution_wh": "64x48", "segment_frames_expanded": [9], "base_prompts_expanded": ["x"]},
         "segment_index": 3},
         "segment_index"),
    ],
)  # fmt: skip
def test_bad_payloads_are_refused_at_post(service: dict, task_type: str, params: dict, needle: str):
    def local(value):
        if isinstance(value, str) and value.endswith((".mp4", ".png")):
            return path(service, value)
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [local(v) for v in value]
        return value

    response = service["client"].post("/tasks", json={"task_type": task_type, "params": local(params)})
    assert response.status_code == 422 and needle in response.text, response.text


def test_inpaint_frames_regenerates_a_range_in_place(service: dict):
    video = service["clips"]["long"]
    params = {"video_path": path(service, "long.mp4"), "inpaint_start_frame": 10, "inpaint_end_frame": 15,
              "context_frame_count": 4, "num_inference_steps": 2, "seed": 3, "prompt": "fix"}  # fmt: skip
    task = post(service, "inpaint_frames", params)
    assert task["output_location"].endswith(f"/{task['id']}_inpainted.mp4")
    frames = output_frames(service, task)
    assert frames.shape == video.shape  # the range replaced, the length kept
    out = levels(frames)
    assert np.abs(out[:6] - levels(video)[:6]).max() < 3
    assert np.abs(out[-10:] - levels(video)[-10:]).max() < 3

    too_late = {**params, "inpaint_start_frame": 24, "inpaint_end_frame": 28}  # 2 frames after, 4 needed
    response = service["client"].post("/tasks", json={"task_type": "inpaint_frames", "params": too_late})
    failed = wait_final(service["client"], response.json()["id"])
    assert failed["status"] == "Failed" and "inpaint_end_frame" in failed["error_message"]


def test_edit_video_orchestrator_regenerates_a_portion(service: dict):
    video = service["clips"]["long"]
    details = {**JOIN, "run_id": "edit1", "source_video_url": path(service, "long.mp4"), "source_video_fps": 16,
               "portions_to_regenerate": [{"start_frame": 10, "end_frame": 14, "prompt": "new middle"}]}  # fmt: skip
    task = post(service, "edit_video_orchestrator", {"orchestrator_details": details})
    frames = output_frames(service, task)
    # keepers 0-9 (10 frames) and 15-29 (15 frames), joined by a 9-frame bridge whose gap is 5
    assert len(frames) == 10 + 15 + 5
    out = levels(frames)
    assert np.abs(out[:8] - levels(video)[:8]).max() < 3
    assert np.abs(out[-13:] - levels(video)[-13:]).max() < 3
    [row] = rows_of(service, task["id"], "join_clips_segment")
    assert row.params["prompt"] == "new middle" and row.output_location == task["output_location"]
    keepers = sorted(p.name for p in (service["files"] / task["id"]).glob("keeper_*.mp4"))
    assert keepers == ["keeper_0.mp4", "keeper_1.mp4"]
    assert probe_video(service["files"] / task["id"] / "keeper_1.mp4")["frames"] == 15


def travel_details(service: dict, **extra) -> dict:
    return {
        "run_id": "indiv",
        "input_image_paths_resolved": [path(service, f"anchor{i}.png") for i in range(3)],
        "base_prompts_expanded": ["first", "second"],
        "segment_frames_expanded": [13, 13],
        "frame_overlap_expanded": [4],
        "parsed_resolution_wh": f"{WIDTH}x{HEIGHT}",
        "num_inference_steps": 2,
        **extra,
    }


def test_individual_travel_segment(service: dict):
    params = {"orchestrator_details": travel_details(service, model_name="tiny-vace"), "segment_index": 1,
              "individual_segment_params": {"num_frames": 9, "base_prompt": "just this one"}}  # fmt: skip
    task = post(service, "individual_travel_segment", params)
    assert task["output_location"].endswith("/indiv_seg01_output.mp4")
    frames = output_frames(service, task)
    assert frames.shape == (9, HEIGHT, WIDTH, 3)
    thumb = load_image((service["files"] / task["id"] / f"thumb_{task['id'][:8]}.jpg").read_bytes())
    assert np.abs(thumb.astype(int) - frames[0]).mean() < 6

    i2v = {"orchestrator_details": travel_details(service, model_type="i2v"), "segment_index": 0}
    task = post(service, "individual_travel_segment", i2v)
    assert task["output_location"].endswith("/indiv_seg00_output.mp4")
    assert output_frames(service, task).shape == (13, HEIGHT, WIDTH, 3)


def travel_rows(service: dict, orchestrator_id: str) -> tuple[list, list]:
    """(segment rows by index, stitch rows) of a travel run."""
    with open_store(service["db"]) as store:
        mine = [t for t in store.list(limit=1000) if t.params.get("orchestrator_task_id") == orchestrator_id]
    segments = sorted(
        (t for t in mine if t.task_type == "travel_segment"), key=lambda t: t.params["segment_index"]
    )
    return segments, [t for t in mine if t.task_type == "travel_stitch"]


def test_travel_variants_end_to_end(service: dict):
    # model_type i2v: independent first/last-frame segments on T2V, unstitched; the output is the last clip
    details = travel_details(service, run_id="i2vrun", model_type="i2v", segment_frames_expanded=[13, 9],
                             crossfade_sharp_amt=0.3)  # fmt: skip
    task = post(service, "travel_orchestrator", {"orchestrator_details": details})
    assert task["output_location"].endswith("/i2vrun_seg01_output.mp4")
    assert output_frames(service, task).shape == (9, HEIGHT, WIDTH, 3)
    segments, stitches = travel_rows(service, task["id"])
    assert stitches == [] and [s.dependant_on for s in segments] == [None, None]
    assert [s.status.value for s in segments] == ["Complete", "Complete"]
    assert all("flf2v" in s.result["model"] for s in segments), [s.result["model"] for s in segments]
    # each segment's clip is an output of the run, listed in its result and kept on disk
    result = task["result"]
    assert result["segment_outputs"] == [s.output_location for s in segments]
    assert [probe_video(service["files"] / s.id / f"i2vrun_seg{i:02d}_output.mp4")["frames"]
            for i, s in enumerate(segments)] == [13, 9]  # fmt: skip
    assert set(result["ignored_params"]) == {"frame_overlap_expanded", "crossfade_sharp_amt"}

    # a single anchor image: one VACE segment that starts on it
    single = {"images": [path(service, "anchor0.png")], "prompt": "alone", "frames": 9, "run_id": "solo",
              "resolution": f"{WIDTH}x{HEIGHT}", "num_inference_steps": 2, "seed": 3, "debug": True}  # fmt: skip
    task = post(service, "travel_orchestrator", single)
    frames = output_frames(service, task)
    assert frames.shape == (9, HEIGHT, WIDTH, 3) and task["output_location"].endswith("/solo_final.mp4")
    # its guide (kept in debug): frame 0 is the image, every later frame grey to generate (no end image)
    guide = guide_of_segment(service, task["id"], "solo", 0)
    anchor = load_image(path(service, "anchor0.png"))
    assert len(guide) == 9 and np.abs(guide[0].astype(int) - anchor).mean() < 8
    assert abs(float(guide[1:].mean()) - 127) < 3
    refused = service["client"].post("/tasks", json={"task_type": "travel_orchestrator", "params": {
        **single, "num_segments": 2}})  # fmt: skip
    assert refused.status_code == 422 and "num_segments" in refused.text


def guide_of_segment(service: dict, orchestrator_id: str, run_id: str, index: int) -> np.ndarray:
    with open_store(service["db"]) as store:
        [row] = [t for t in store.list(task_type="travel_segment", limit=1000)
                 if t.params["orchestrator_task_id"] == orchestrator_id and t.params["segment_index"] == index]  # fmt: skip
    return decode_video(service["files"] / row.id / f"{run_id}_seg{index:02d}_guide.mp4")[0]


def test_structure_video_guides_travel_segments(service: dict):
    details = travel_details(service, run_id="structured", model_name="tiny-vace", debug_mode_enabled=True,
                             structure_video_path=path(service, "bar.mp4"), structure_type="canny")  # fmt: skip
    task = post(service, "travel_orchestrator", {"orchestrator_details": details})
    # the original's newest rule: segment 1 generates 13 + 4 context frames, so the video has Σ frames
    assert len(output_frames(service, task)) == 13 + 13
    for index in (0, 1):
        guide = guide_of_segment(service, task["id"], "structured", index)
        generated = guide[5:12]  # frames between the kept ones (anchors, the previous segment's overlap)
        # canny edges of the moving bar: white lines on black, not VACE's flat grey 127
        assert generated.mean() < 40 and generated.max() > 150, (index, generated.mean(), generated.max())
        assert abs(float(guide[0].mean()) - 127) > 20  # frame 0 is kept (anchor or overlap), not control

    plain = post(service, "travel_orchestrator",
                 {"orchestrator_details": travel_details(service, run_id="plain", debug_mode_enabled=True)})  # fmt: skip
    generated = guide_of_segment(service, plain["id"], "plain", 0)[5:12]
    assert abs(float(generated.mean()) - 127) < 3  # without structure guidance: grey to generate


def test_structure_refusals_name_the_field_at_post(service: dict):
    def refused(**extra) -> str:
        details = travel_details(service, structure_video_path=path(service, "bar.mp4"), **extra)
        response = service["client"].post(
            "/tasks", json={"task_type": "travel_orchestrator", "params": {"orchestrator_details": details}}
        )
        assert response.status_code == 422, response.text
        return response.text

    text = refused(structure_type="depth")  # no depth model installed here
    assert "structure_type" in text and "depth model" in text
    assert "structure_type" in refused(structure_type="uni3c")
    missing = travel_details(
        service, structure_video_path=path(service, "nothing.mp4"), structure_type="flow"
    )
    response = service["client"].post(
        "/tasks", json={"task_type": "travel_orchestrator", "params": {"orchestrator_details": missing}}
    )
    assert response.status_code == 422 and "nothing.mp4" in response.text, response.text


def test_vace_control_letters_over_http(service: dict):
    base = {"prompt": "bar", "video_guide": path(service, "bar.mp4"), "resolution": f"{WIDTH}x{HEIGHT}",
            "video_length": 9, "num_inference_steps": 2, "seed": 7}  # fmt: skip
    plain = output_frames(service, post(service, "vace", {**base, "video_prompt_type": "V"})).astype(int)
    again = output_frames(service, post(service, "vace", {**base, "video_prompt_type": "V"})).astype(int)
    edges = output_frames(service, post(service, "vace", {**base, "video_prompt_type": "EV"})).astype(int)
    assert plain.shape == edges.shape == (9, HEIGHT, WIDTH, 3)
    # the same task generates the same video; the Canny letter changed what VACE was given
    assert np.abs(plain - again).mean() < np.abs(plain - edges).mean()

    for letters, needle in (("SV", "scribble"), ("DV", "depth model")):
        response = service["client"].post(
            "/tasks", json={"task_type": "vace", "params": {**base, "video_prompt_type": letters}}
        )
        assert (
            response.status_code == 422 and "video_prompt_type" in response.text and needle in response.text
        )


def test_a_model_of_another_family_fails_the_join_once_naming_it(service: dict):
    params = {**JOIN, "starting_video_path": path(service, "a.mp4"), "ending_video_path": path(service, "b.mp4"),
              "model": "tiny-t2v"}  # fmt: skip
    response = service["client"].post("/tasks", json={"task_type": "join_clips_segment", "params": params})
    task = wait_final(service["client"], response.json()["id"])
    assert task["status"] == "Failed" and "tiny-t2v" in task["error_message"], task
    assert task["attempts"] == 1  # an input problem is not retried


def test_cancelling_a_join_run_cancels_its_rows(service: dict):
    clips = [{"url": path(service, f"{n}.mp4")} for n in "abc"]
    details = {**JOIN, "run_id": "cancelled", "clip_list": clips, "num_inference_steps": 200,
               "resolution": "128x96"}  # fmt: skip
    client = service["client"]
    task_id = client.post(
        "/tasks", json={"task_type": "join_clips_orchestrator", "params": {"orchestrator_details": details}}
    ).json()["id"]
    deadline = time.monotonic() + 120
    while (
        not rows_of(service, task_id, "join_clips_segment")
        or client.get(f"/tasks/{task_id}").json()["status"] != "In Progress"
    ):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    time.sleep(1.0)  # the first bridge is generating
    assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
    assert wait_final(client, task_id)["status"] == "Cancelled"
    deadline = time.monotonic() + 30
    while {r.status.value for r in rows_of(service, task_id, "join_clips_segment")} != {"Cancelled"}:
        assert time.monotonic() < deadline, [
            r.status.value for r in rows_of(service, task_id, "join_clips_segment")
        ]
        time.sleep(0.1)


def test_a_reclaimed_join_run_reuses_finished_joins(service: dict):
    """A run whose first join's row is already Complete (a previous attempt's) joins on from its output."""
    orchestrator_id = str(uuid.uuid4())
    first_row = mirror_id(orchestrator_id, "join_clips_segment:0")
    storage = OutputStorage(StorageConfig(root=str(service["files"])))
    earlier = storage.save_bytes(
        first_row, encode_mp4(service["clips"]["c"], fps=16), "earlier.mp4", "video/mp4"
    )
    with open_store(service["db"]) as store:
        # a row no-one claims (managed) holds the finished join back from the dispatcher until it completes
        blocker = store.create(NewTask(task_type="travel_stitch", params={"blocks": first_row}))
        store.create(NewTask(id=first_row, task_type="join_clips_segment", dependant_on=blocker.id,
                             params={"orchestrator_task_id_ref": orchestrator_id, "join_index": 0,
                                     "ending_video_path": path(service, "b.mp4")}))  # fmt: skip
        store.start(first_row, "earlier-worker")
        store.complete(first_row, earlier.output_location, worker_id="earlier-worker")
    clips = [{"url": path(service, f"{n}.mp4")} for n in "abc"]
    response = service["client"].post("/tasks", json={"task_type": "join_clips_orchestrator", "task_id": orchestrator_id,
                                                      "params": {"orchestrator_details": {**JOIN, "clip_list": clips}}})  # fmt: skip
    assert response.status_code == 201, response.text
    task = wait_final(service["client"], orchestrator_id)
    assert task["status"] == "Complete", task["error_message"]
    frames = output_frames(service, task)
    assert (
        len(frames) == 12 + 12 + 5
    )  # join 1 joined the stored 12-frame output with clip c, not a 29-frame join
    assert np.abs(levels(frames)[:10] - levels(service["clips"]["c"])[:10]).max() < 3
    rows = rows_of(service, orchestrator_id, "join_clips_segment")
    assert rows[0].attempts == 1 and rows[0].output_location == earlier.output_location  # not generated again
