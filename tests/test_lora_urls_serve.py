"""LoRAs by URL end to end: a real Ray cluster (fake GPUs), the tiny T2V model, a loopback server serving a
LoRA in ComfyUI key format (allowlisted through $HWGP_INPUT_URL_ALLOW)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
from diffusers import WanTransformer3DModel
from lora_server import comfyui_wan_lora, serving

from db.store import open_store
from deployments.lora_fetch import content_name
from hwgp_testing import running_app, wait_final
from Wan2GP.tiny import ensure_tiny_models
from Wan2GP.video import decode_video, encode_png

pytestmark = pytest.mark.slow

PARAMS = {"prompt": "a cat", "resolution": "64x48", "num_inference_steps": 2, "seed": 7, "video_length": 5}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("loraurl")
    transformer = WanTransformer3DModel.from_pretrained(ensure_tiny_models() / "t2v", subfolder="transformer")
    lora = comfyui_wan_lora(transformer, seed=5)
    files = {"/hf/style.safetensors": lora, "/hf/style.bin": lora}
    saved = {name: os.environ.get(name) for name in ("HWGP_INPUT_URL_ALLOW", "HWGP_CACHE_DIR")}
    with serving(files) as (base, hits):
        # Ray's workers inherit this process's environment: the replica's LoRA folder, the allowlist.
        os.environ["HWGP_INPUT_URL_ALLOW"] = base.removeprefix("http://")
        os.environ["HWGP_CACHE_DIR"] = str(root / "cache")
        inputs = root / "inputs"
        inputs.mkdir()
        for i, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
            (inputs / f"anchor{i}.png").write_bytes(encode_png(np.full((48, 64, 3), colour, np.uint8)))
        family = {"num_gpus": 0.5, "num_cpus": 0.1}
        config = {
            "db": f"sqlite:///{root / 'tasks.db'}",
            "storage": {"root": str(root / "files")},
            "input_dirs": [str(inputs)],
            "models": "tiny",
            "deployments": {"T2V": family, "VACE": family},
            "ingress": {"heartbeat_interval_s": 0.5, "poll_interval_s": 0.2, "shutdown_grace_s": 1.0},
        }
        try:
            with running_app(config) as client:
                yield {
                    "client": client, "base": base, "db": config["db"], "hits": hits, "lora": lora,
                    "files": root / "files", "lora_dir": root / "cache" / "loras", "inputs": inputs,
                }  # fmt: skip
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run(service: dict, params: dict) -> dict:
    response = service["client"].post("/tasks", json={"task_type": "t2v", "params": {**PARAMS, **params}})
    assert response.status_code == 201, response.text
    return wait_final(service["client"], response.json()["id"], timeout_s=120)


def frames(service: dict, task: dict) -> np.ndarray:
    return decode_video((service["files"] / task["output_location"].removeprefix("files/")).read_bytes())[0]


def test_lora_url_is_fetched_once_and_changes_the_output(service: dict):
    url = f"{service['base']}/hf/style.safetensors"
    name = content_name(hashlib.sha256(service["lora"]).hexdigest())
    plain = run(service, {})
    with_lora = run(service, {"activated_loras": [url], "loras_multipliers": "1.0"})
    assert plain["status"] == "Complete" and with_lora["status"] == "Complete", with_lora
    difference = np.abs(frames(service, with_lora).astype(np.int16) - frames(service, plain).astype(np.int16))
    assert difference.mean() > 0.5
    assert with_lora["result"]["loras"] == [{"file": name, "multiplier": 1.0}]

    pinned = f"{url}#sha256={hashlib.sha256(service['lora']).hexdigest()}"
    again = run(service, {"additional_loras": {pinned: 1.0}})
    assert again["status"] == "Complete", again
    assert (frames(service, again) == frames(service, with_lora)).all()
    assert service["hits"]["/hf/style.safetensors"] == 1  # the second task used the cache
    assert [p.name for p in service["lora_dir"].iterdir()] == [name]  # the replica's folder


def test_travel_segments_use_a_lora_url(service: dict):
    url = f"{service['base']}/hf/style.safetensors"
    params = {
        "images": [str(service["inputs"] / f"anchor{i}.png") for i in range(2)],
        "prompt": "red to blue",
        "frames": 9,
        "resolution": "64x48",
        "num_inference_steps": 2,
        "seed": 3,
        "activated_loras": [url],
        "loras_multipliers": "0.8",
    }
    response = service["client"].post("/tasks", json={"task_type": "travel_orchestrator", "params": params})
    assert response.status_code == 201, response.text
    orchestrator = wait_final(service["client"], response.json()["id"], timeout_s=180)
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    with open_store(service["db"]) as store:
        segments = [
            t for t in store.list(limit=100)
            if t.task_type == "travel_segment" and t.params.get("orchestrator_task_id") == orchestrator["id"]
        ]  # fmt: skip
    name = content_name(hashlib.sha256(service["lora"]).hexdigest())
    assert len(segments) == 1 and segments[0].result["loras"] == [{"file": name, "multiplier": 0.8}]


def test_bad_pin_fails_the_task_naming_the_field(service: dict):
    wrong = "f" * 64
    task = run(service, {"activated_loras": [f"{service['base']}/hf/style.safetensors#sha256={wrong}"]})
    assert task["status"] == "Failed"
    assert task["error_message"].startswith(f"activated_loras: sha256 mismatch: the URL pins {wrong}")


@pytest.mark.parametrize(
    ("lora", "problem"),
    [
        ("{base}/hf/style.bin", "must name a .safetensors file"),
        ("http://10.20.30.40/hf/style.safetensors", "could not fetch the URL"),
        ("http://127.0.0.1:1/hf/style.safetensors", "could not fetch the URL"),  # loopback, not allowlisted
    ],
)
def test_refused_at_post(service: dict, lora: str, problem: str):
    body = {"task_type": "t2v", "params": {**PARAMS, "activated_loras": [lora.format(base=service["base"])]}}
    response = service["client"].post("/tasks", json=body)
    assert response.status_code == 422, response.text
    assert "activated_loras" in response.text and problem in response.text
    assert service["hits"]["/hf/style.bin"] == 0


def test_the_original_clients_travel_payload_unchanged(service: dict):
    """What the original's clients send today: the orchestrator_details form, a Wan 2.2 Lightning model
    (its tiny stand-in), a two-phase phase_config with per-phase LoRAs, and brightness 0 ("unchanged")."""
    from Wan2GP.tiny import TINY_WAN22_LORAS

    high, low = (name.removesuffix(".safetensors") for name in TINY_WAN22_LORAS)
    details = {
        "run_id": "client",
        "input_image_paths_resolved": [str(service["inputs"] / f"anchor{i}.png") for i in range(2)],
        "num_new_segments_to_generate": 1,
        "base_prompts_expanded": ["red to blue"],
        "negative_prompts_expanded": [""],
        "segment_frames_expanded": [9],
        "frame_overlap_expanded": [],
        "parsed_resolution_wh": "64x48",
        "model_name": "tiny-vace-22-lightning",
        "seed_base": 11,
        "after_first_post_generation_brightness": 0,
        "after_first_post_generation_saturation": 1,
        "phase_config": {
            "num_phases": 2,
            "steps_per_phase": [1, 1],
            "flow_shift": 5,
            "sample_solver": "euler",
            "model_switch_phase": 1,
            "phases": [
                {"phase": 1, "guidance_scale": 3, "loras": [{"url": high, "multiplier": "1.0"}]},
                {"phase": 2, "guidance_scale": 1, "loras": [{"url": low, "multiplier": "1.0"}]},
            ],
        },
    }
    response = service["client"].post(
        "/tasks", json={"task_type": "travel_orchestrator", "params": {"orchestrator_details": details}}
    )
    assert response.status_code == 201, response.text
    orchestrator = wait_final(service["client"], response.json()["id"], timeout_s=240)
    assert orchestrator["status"] == "Complete", orchestrator["error_message"]
    video = frames(service, orchestrator)
    assert len(video) == 9 and video.mean() > 10  # brightness 0 leaves the video as generated, not black
    with open_store(service["db"]) as store:
        segment = next(
            t for t in store.list(limit=100)
            if t.task_type == "travel_segment" and t.params.get("orchestrator_task_id") == orchestrator["id"]
        )  # fmt: skip
    phases = segment.result["phases"]
    assert [p["guidance_scale"] for p in phases] == [3.0, 1.0], phases
    assert segment.result["model"] == "tiny-vace-22-lightning"
