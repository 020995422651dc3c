"""What one task may ask for (issue 16 items 3, 5, 6): the work budget, list caps, LoRA names, input
references checked at POST, and inputs that used to give 500s. The real api, routing and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_fixtures import api

from deployments.limits import LARGEST_NORMAL_JOB, LimitSettings

TRAVEL = {"images": ["a.png", "b.png", "c.png"], "prompt": "a walk", "frames": 33, "overlap": 8,
          "resolution": "64x48"}  # fmt: skip


def refused(client, body: dict, status: int = 422) -> dict:
    response = client.post("/tasks", json=body)
    assert response.status_code == status, (body, response.status_code, response.text)
    return response.json()["detail"][0]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(b"\x89PNG fake")
    return folder


def test_the_default_budget_admits_normal_jobs_and_refuses_their_product(tmp_path: Path, inputs: Path):
    with api(tmp_path) as (client, store, _):
        # The largest real model's normal job (1280x720, 81 frames, 50 steps) passes...
        normal = {"prompt": "x", "model": "tiny-t2v", "resolution": "1280x720", "video_length": 81,
                  "num_inference_steps": 50}  # fmt: skip
        assert client.post("/tasks", json={"task_type": "t2v", "params": normal}).status_code == 201
        # ...each value at its own cap passes the field checks, but not their product.
        huge = {**normal, "resolution": "4096x4096", "video_length": 1025, "num_inference_steps": 200}
        detail = refused(client, {"task_type": "t2v", "params": huge})
        assert detail["loc"] == ["body", "params"]
        assert "4096x4096 x 1025 frames x 200 steps" in detail["msg"] and "limits.max_work" in detail["msg"]
        assert "resolution, video_length or num_inference_steps" in detail["msg"]
        # Model defaults fill what params omit (tiny-t2v: its own default size, frames and steps).
        flux = {"prompt": "x", "model": "tiny-flux", "resolution": "4096x4096", "video_length": 16,
                "num_inference_steps": 200}  # fmt: skip
        assert "16 frames" in refused(client, {"task_type": "flux", "params": flux})["msg"]

        # Lists: anchors, references, clips (any list in params), LoRAs.
        many_images = {**TRAVEL, "images": [f"{i}.png" for i in range(5000)]}
        detail = refused(client, {"task_type": "travel_orchestrator", "params": many_images})
        assert (
            detail["loc"] == ["body", "params", "images"] and "5000 items; the limit is 64" in detail["msg"]
        )
        refs = {"prompt": "x", "model": "tiny-vace", "image_refs": ["a.png"] * 20000}
        assert refused(client, {"task_type": "vace", "params": refs})["loc"] == [
            "body",
            "params",
            "image_refs",
        ]
        clips = {"clips": ["a.mp4"] * 100}
        assert refused(client, {"task_type": "join_clips", "params": clips})["loc"] == [
            "body",
            "params",
            "clips",
        ]
        nested = {"orchestrator_details": {"input_image_paths_resolved": ["a.png"] * 65}}
        detail = refused(client, {"task_type": "travel_orchestrator", "params": nested})
        assert detail["loc"] == ["body", "params", "orchestrator_details", "input_image_paths_resolved"]
        deep: list = []
        for _ in range(40):
            deep = [deep]
        detail = refused(client, {"task_type": "t2v", "params": {"prompt": "x", "extra": deep}})
        assert detail["loc"][:2] == ["body", "params"] and detail["loc"][2].startswith("extra[0][0]")
        assert "nested more than 32 levels deep" in detail["msg"]
        loras = {"prompt": "x", "activated_loras": ",".join(f"l{i}" for i in range(40))}
        detail = refused(client, {"task_type": "t2v", "params": loras})
        assert detail["loc"] == ["body", "params", "activated_loras"] and "40 LoRAs" in detail["msg"]

        # A travel: its segments' work, its final frames and its upscaled size.
        ok = client.post("/tasks", json={"task_type": "travel_orchestrator", "params": TRAVEL})
        assert ok.status_code == 201, ok.text
        big = {**TRAVEL, "resolution": "4096x4096", "frames": 1025}
        assert "units of work" in refused(client, {"task_type": "travel_orchestrator", "params": big})["msg"]
        upscaled = {**TRAVEL, "upscale_factor": 8.0, "resolution": "1280x720"}
        detail = refused(client, {"task_type": "travel_orchestrator", "params": upscaled})
        assert detail["loc"] == ["body", "params", "upscale_factor"] and "10240x5760" not in detail["msg"]
        assert "limits.max_output_pixels" in detail["msg"]
        # Only the two accepted tasks were stored (one snapshot: a worker may be moving them on meanwhile).
        counts = store.count_by_status()
        assert sum(counts.values()) == 2, counts


def test_limits_are_configurable(tmp_path: Path, inputs: Path):
    limits = LimitSettings(max_work=LARGEST_NORMAL_JOB // 100, max_list_items=2, max_output_frames=40)
    with api(tmp_path, limits=limits) as (client, _, _):
        normal = {"prompt": "x", "model": "tiny-t2v", "resolution": "1280x720", "video_length": 81,
                  "num_inference_steps": 50}  # fmt: skip
        assert "limits.max_work" in refused(client, {"task_type": "t2v", "params": normal})["msg"]
        detail = refused(client, {"task_type": "travel_orchestrator", "params": TRAVEL})
        assert detail["loc"] == ["body", "params", "images"] and "limit is 2" in detail["msg"]
        two = {**TRAVEL, "images": ["a.png", "b.png"], "frames": 45}
        detail = refused(client, {"task_type": "travel_orchestrator", "params": two})
        assert detail["loc"] == ["body", "params", "frames"] and "45 frames" in detail["msg"]


def test_lora_names_must_stay_inside_the_lora_folders(tmp_path: Path):
    with api(tmp_path) as (client, _, _):
        for names, loc in [
            (["/etc/passwd"], ["body", "params", "activated_loras"]),
            (["ok.safetensors", "../../tasks.db"], ["body", "params", "activated_loras"]),
            (["weights.ckpt"], ["body", "params", "activated_loras"]),
            (["C:\\loras\\x.safetensors"], ["body", "params", "activated_loras"]),
        ]:
            detail = refused(
                client, {"task_type": "t2v", "params": {"prompt": "x", "activated_loras": names}}
            )
            assert detail["loc"] == loc, detail
            assert "exist" not in detail["msg"] and "not found" not in detail["msg"]  # no file probing
        detail = refused(client, {"task_type": "t2v", "params": {"additional_loras": {"~/.ssh/id_rsa": 1.0}}})
        assert detail["loc"] == ["body", "params", "additional_loras"] and "~/.ssh/id_rsa" in detail["msg"]
        fine = {"prompt": "x", "activated_loras": ["style.safetensors", "folder/detail", "causvid"]}
        assert client.post("/tasks", json={"task_type": "t2v", "params": fine}).status_code == 201


def test_inputs_that_used_to_give_500(tmp_path: Path):
    with api(tmp_path) as (client, store, _):
        numeric = {"prompt": "x", "activated_loras": ["a.safetensors"], "loras_multipliers": 0.7}
        created = client.post("/tasks", json={"task_type": "t2v", "params": numeric})
        assert created.status_code == 201, created.text  # one number: the one LoRA's multiplier
        for bad in ({"a": 1}, True, [[1]]):
            params = {**numeric, "loras_multipliers": bad}
            assert refused(client, {"task_type": "t2v", "params": params})["loc"][:3] == [
                "body", "params", "loras_multipliers"]  # fmt: skip
        huge = client.get("/tasks", params={"offset": "99999999999999999999"})
        assert huge.status_code == 422 and huge.json()["detail"][0]["loc"] == ["query", "offset"]
        assert client.get("/tasks", params={"offset": str(2**31 - 1)}).json() == []
        for raw, loc in [
            (b'{"task_type": "t2v", "params": {"prompt": "\\ud800"}}', ["body", "params", "prompt"]),
            (
                b'{"task_type": "t2v", "params": {"prompt": "x"}, "project_id": "\\udfff"}',
                ["body", "project_id"],
            ),
            (b'{"task_type": "t2v", "params": {"prompt": "a\\u0000b"}}', ["body", "params", "prompt"]),
        ]:
            response = client.post("/tasks", content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == loc, response.text
        assert client.get("/tasks").status_code == 200  # nothing unreadable was stored
        priority = client.post("/tasks", json={"task_type": "t2v", "params": {}, "priority": 10**30})
        assert priority.status_code == 422 and priority.json()["detail"][0]["loc"] == ["body", "priority"]


def test_input_references_are_checked_at_post(tmp_path: Path, inputs: Path):
    from storage_fixtures import MediaServer

    media = MediaServer().start()
    try:
        with api(tmp_path) as (client, store, _):
            for ref, msg in [
                ("http://127.0.0.1:1/a.png", "could not fetch the URL: the address is not allowed"),
                ("http://2130706433/a.png", "the address is not allowed"),
                ("http://169.254.169.254/latest/meta-data", "the address is not allowed"),
                ("file:///etc/passwd", "scheme"),
                ("/etc/passwd", ""),
                ("missing.png", ""),
            ]:
                detail = refused(client, {"task_type": "i2v", "params": {"prompt": "x", "image_start": ref}})
                assert detail["loc"] == ["body", "params", "image_start"] and msg in detail["msg"], detail
            travel = {**TRAVEL, "images": ["a.png", media.url("/b.png"), "c.png"]}
            detail = refused(client, {"task_type": "travel_orchestrator", "params": travel})
            assert detail["loc"] == ["body", "params", "anchors[1]"] and "not allowed" in detail["msg"]
            refs = {"prompt": "x", "model": "tiny-vace", "image_refs": ["a.png", "http://10.0.0.5/x.png"]}
            detail = refused(client, {"task_type": "vace", "params": refs})
            assert detail["loc"] == ["body", "params", "image_refs[1]"]
            assert sum(store.count_by_status().values()) == 0
        allowed = f"127.0.0.1:{media.url('/').split(':')[2].rstrip('/')}"
        with api(tmp_path / "allow", input_url_allow=[allowed]) as (client, _, _):
            ok = {"prompt": "x", "model": "tiny-i2v", "image_start": media.url("/a.png")}
            assert client.post("/tasks", json={"task_type": "i2v", "params": ok}).status_code == 201
    finally:
        media.stop()
