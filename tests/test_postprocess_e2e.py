"""Output post-processing end to end over HTTP: a tiny t2v with the original's spatial_upsampling,
temporal_upsampling and film grain, on a real local Ray cluster (fake GPUs), real SQLite and real ffmpeg.
The replica hands back the generated frames; the CPU stage post-processes and encodes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.store import open_store
from hwgp_testing import running_app, wait_final
from Wan2GP.video import decode_video, probe_video

pytestmark = pytest.mark.slow


def test_t2v_with_lanczos2_rife2_and_film_grain_over_http(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 'tasks.db'}"
    config = {
        "db": db,
        "storage": {"root": str(tmp_path / "public" / "files")},
        "models": "tiny",
        "deployments": {"T2V": {"num_gpus": 0.5, "num_cpus": 0.1}},
        "ingress": {"heartbeat_interval_s": 0.5, "poll_interval_s": 0.2, "shutdown_grace_s": 1.0},
    }
    params = {"prompt": "a cat", "resolution": "64x48", "video_length": 9, "num_inference_steps": 2,
              "seed": 7, "fps": 16, "spatial_upsampling": "lanczos2", "temporal_upsampling": "rife2",
              "film_grain_intensity": 0.05}  # fmt: skip
    with running_app(config) as client:
        bad = client.post(
            "/tasks", json={"task_type": "t2v", "params": {**params, "spatial_upsampling": "x3"}}
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "spatial_upsampling"
        response = client.post("/tasks", json={"task_type": "t2v", "params": params})
        assert response.status_code == 201, response.text
        task_id = response.json()["id"]
        task = wait_final(client, task_id)
        assert task["status"] == "Complete", task["error_message"]
        output = client.get(f"/tasks/{task_id}/output")
        assert output.status_code == 200
    info = probe_video(output.content)
    frames, fps = decode_video(output.content)
    # 9 generated frames -> (9 - 1) * 2 + 1 = 17 at 32 fps, 64x48 -> 128x96
    assert (info["frames"], info["width"], info["height"]) == (17, 128, 96)
    assert frames.shape == (17, 96, 128, 3) and round(fps) == 32
    with open_store(db, migrate=False) as store:
        result = store.get(task_id).result
    assert (result["frames"], result["fps"], result["width"], result["height"]) == (17, 32, 128, 96)
    assert result["interpolator"] == "dis_flow"  # no flownet.pkl installed here
    post = result["postprocess"]
    assert post["generated"] == {"frames": 9, "fps": 16, "width": 64, "height": 48}
    assert (post["spatial_upsampling"], post["temporal_upsampling"]) == ("lanczos2", "rife2")
    assert post["film_grain_intensity"] == 0.05 and post["film_grain_seed"] == 7
    assert result["timings"]["postprocess"] > 0 and result["timings"]["encode"] > 0
    assert "spatial_upsampling" not in result.get("ignored_params", {})
