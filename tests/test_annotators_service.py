"""`generate_openpose` and `rife_interpolate_images` through the HTTP service with annotator weights
installed ($HWGP_ANNOTATORS_DIR, set before the Ray cluster starts so its workers inherit it).

A real local Ray cluster and Serve application; the weight files are the real classes with tiny widths
(tests/annotator_fixtures.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from annotator_fixtures import (
    SEEING_SIZE,
    random_rife,
    save_openpose,
    save_rife,
    seeing_figure_image,
    seeing_openpose,
)

from dag.pose import render_people
from hwgp_testing import running_app, wait_final
from Wan2GP.annotators import ANNOTATORS_ENV, OPENPOSE_FILE
from Wan2GP.openpose import OpenposeBody
from Wan2GP.rife import RifeInterpolator
from Wan2GP.video import decode_video, encode_png, load_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("annotators_service")
    annotators, inputs = root / "annotators", root / "inputs"
    inputs.mkdir()
    save_openpose(seeing_openpose(), annotators)
    rife = random_rife(3)
    save_rife(rife, annotators)
    (inputs / "person.png").write_bytes(encode_png(seeing_figure_image()))
    for shift in (0, 24):
        image = np.full((48, 64, 3), (30, 60, 90), np.uint8)
        image[14:30, 8 + shift : 24 + shift] = (250, 240, 40)
        (inputs / f"square{shift}.png").write_bytes(encode_png(image))
    config = {
        "db": f"sqlite:///{root / 'tasks.db'}",
        "storage": {"root": str(root / "public" / "files")},
        "input_dirs": [str(inputs)],
        "models": "tiny",
        "deployments": {},  # utility tasks need no generation deployment
        "ingress": {"poll_interval_s": 0.2, "shutdown_grace_s": 0.5},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ANNOTATORS_ENV, str(annotators))
        with running_app(config) as client:
            yield {"client": client, "inputs": inputs, "annotators": annotators, "rife": rife}


def _run(service: dict, task_type: str, params: dict) -> dict:
    response = service["client"].post("/tasks", json={"task_type": task_type, "params": params})
    assert response.status_code == 201, response.text
    task = wait_final(service["client"], response.json()["id"])
    assert task["status"] == "Complete", task["error_message"]
    return task


def test_generate_openpose_runs_openpose(service: dict):
    task = _run(service, "generate_openpose", {"input_image_path": str(service["inputs"] / "person.png")})
    assert task["result"]["pose_estimator"] == "openpose", task["result"]
    assert task["result"]["frames_with_pose"] == 1
    frame = load_image(service["client"].get(f"/tasks/{task['id']}/output").content)
    # the skeleton the same weights draw here (the worker's float rounding may differ a hair: compare pixels)
    estimator = OpenposeBody.load(service["annotators"] / OPENPOSE_FILE, device="cpu")
    expected = render_people(estimator(seeing_figure_image()), SEEING_SIZE, SEEING_SIZE)
    assert frame.shape == expected.shape and expected.any()
    assert (frame != expected).any(axis=-1).mean() < 0.005


def test_rife_interpolate_images_runs_rife(service: dict):
    inputs = service["inputs"]
    params = {"input_image_path1": str(inputs / "square0.png"), "input_image_path2": str(inputs / "square24.png"),
              "frames": 5}  # fmt: skip
    task = _run(service, "rife_interpolate_images", params)
    assert task["result"]["interpolator"] == "rife", task["result"]
    assert task["result"]["times"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    frames, _ = decode_video(service["client"].get(f"/tasks/{task['id']}/output").content)
    assert frames.shape == (5, 48, 64, 3)
    first, second = (load_image(str(inputs / name)) for name in ("square0.png", "square24.png"))
    expected, _ = RifeInterpolator(service["rife"], device="cpu")(first, second, 5)
    # the video is lossy: each middle frame is nearer the network's frame than a plain cross-fade
    for i in (1, 2, 3):
        fade = (1 - i / 4) * first + (i / 4) * second
        assert np.abs(frames[i] - expected[i].astype(float)).mean() < np.abs(frames[i] - fade).mean()
