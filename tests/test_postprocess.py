"""Output post-processing (Wan2GP/postprocess.py): the original's temporal_upsampling, spatial_upsampling and
film grain keys, each transform, their validation (422 naming the key), the work limits and the CPU hook.

RIFE runs from a tiny random-weight ``flownet.pkl`` (the real IFNet class, saved in Wan2GP's format); without
it the weight-free DIS flow interpolator runs, and the result names which one did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from annotator_fixtures import random_rife, save_rife
from api_fixtures import api
from pydantic import ValidationError

from dag.interpolate import dis_flow_interpolate
from dag.travel_plan import parse_travel
from Wan2GP.annotators import ANNOTATORS_ENV
from Wan2GP.artifact import Artifact, Rendered, encode_rendered
from Wan2GP.params import ORCHESTRATION_REFUSED_KEYS, parse_params, postprocess_request
from Wan2GP.postprocess import (
    PostProcess,
    add_film_grain,
    apply_postprocess,
    spatial_upsample,
    temporal_upsample,
)
from Wan2GP.rife import RifeInterpolator
from Wan2GP.video import decode_video, encode_mp4

# The engine fixtures (tiny models built once per session) live in tests/engine_fixtures.py.
pytest_plugins = ["engine_fixtures"]


@pytest.fixture(autouse=True)
def no_annotators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ANNOTATORS_ENV, raising=False)


def moving_bar(frames: int = 5, height: int = 48, width: int = 64) -> np.ndarray:
    video = np.full((frames, height, width, 3), (30, 60, 90), np.uint8)
    for t in range(frames):
        video[t, 12:36, 4 + 6 * t : 16 + 6 * t] = (250, 240, 40)
    return video


def rendered(frames: np.ndarray, fps: int = 16, seed: int = 7) -> Rendered:
    meta = {"seed": seed, "fps": fps, "frames": len(frames), "timings": {"denoise": 1.0}}
    return Rendered(frames, fps, "task", meta)


# ---------------------------------------------------------------------------------------------------------
# The transforms
# ---------------------------------------------------------------------------------------------------------


def test_spatial_upsampling_sizes_follow_wan2gp_rounding():
    assert PostProcess(spatial_upsampling="lanczos1.5").output_size(832, 480) == (1248, 720)
    assert PostProcess(spatial_upsampling="lanczos1.5").output_size(65, 33) == (97, 49)  # int(), not round()
    assert PostProcess(spatial_upsampling="lanczos2").output_size(64, 48) == (128, 96)
    video = moving_bar(3)
    out = spatial_upsample(video, 96, 72)
    assert out.shape == (3, 72, 96, 3) and out.dtype == np.uint8
    # Lanczos keeps flat areas and the bar where it was, 1.5x further right
    assert (out[:, 2, 2] == (30, 60, 90)).all()
    assert (out[0, 30, 9 * 3 // 2 + 6] == (250, 240, 40)).all()


def test_temporal_upsampling_frame_counts_are_wan2gps(tmp_path: Path):
    video = moving_bar(5)
    for name, factor in (("rife2", 2), ("rife4", 4)):
        assert PostProcess(temporal_upsampling=name).output_frames(5) == (5 - 1) * factor + 1
        out, interpolator = temporal_upsample(video, factor)
        assert interpolator == "dis_flow" and out.shape == ((5 - 1) * factor + 1, 48, 64, 3)
        np.testing.assert_array_equal(out[::factor], video)  # every generated frame kept, in place
        np.testing.assert_array_equal(out[1], dis_flow_interpolate(video[0], video[1], factor + 1)[1])
    assert PostProcess(temporal_upsampling="rife2").output_frames(1) == 1


def test_rife_runs_when_flownet_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    net = random_rife(3)
    save_rife(net, tmp_path)
    monkeypatch.setenv(ANNOTATORS_ENV, str(tmp_path))
    video = moving_bar(3)
    out, interpolator = temporal_upsample(video, 2)
    assert interpolator == "rife" and out.shape == (5, 48, 64, 3)
    np.testing.assert_array_equal(out[::2], video)
    expected = RifeInterpolator(net, device="cpu")(video[1], video[2], 3)[0][1]
    assert np.abs(out[3].astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(out[3].astype(int) - dis_flow_interpolate(video[1], video[2], 3)[1]).mean() > 1
    # the result names it
    result = apply_postprocess(rendered(video), PostProcess(temporal_upsampling="rife2"))
    assert result.metadata["interpolator"] == "rife"


def test_film_grain_statistics_follow_wan2gps_formula():
    grey = np.full((4, 64, 64, 3), 128, np.uint8)
    intensity, saturation = 0.04, 0.5
    out = add_film_grain(grey, intensity, saturation, seed=11)
    noise = out.astype(float) - 128.0
    per_channel = noise.reshape(-1, 3)
    # green: N(0, 1); red: 2 r s + g (1 - s); blue: 3 b s + g (1 - s) -- times intensity x 255
    expected = intensity * 255 * np.sqrt([4 * saturation**2 + (1 - saturation) ** 2, 1.0,
                                          9 * saturation**2 + (1 - saturation) ** 2])  # fmt: skip
    np.testing.assert_allclose(per_channel.std(axis=0), expected, rtol=0.03)
    assert np.abs(per_channel.mean(axis=0)).max() < 0.3
    correlation = np.corrcoef(per_channel[:, 0], per_channel[:, 1])[0, 1]
    assert correlation == pytest.approx(
        (1 - saturation) / np.sqrt(4 * saturation**2 + (1 - saturation) ** 2), abs=0.02
    )
    # saturation 0: monochrome grain
    mono = add_film_grain(grey, intensity, 0.0, seed=11).astype(int)
    assert (mono[..., 0] == mono[..., 1]).all() and (mono[..., 2] == mono[..., 1]).all()


def test_film_grain_is_reproducible_from_the_seed():
    video = moving_bar(3)
    a = add_film_grain(video, 0.1, 0.5, seed=5)
    np.testing.assert_array_equal(a, add_film_grain(video, 0.1, 0.5, seed=5))
    assert (a != add_film_grain(video, 0.1, 0.5, seed=6)).mean() > 0.5
    assert (a != video).mean() > 0.5
    # through the hook: the engine's seed (metadata) is the grain's
    post = PostProcess(film_grain_intensity=0.1)
    first = apply_postprocess(rendered(video, seed=5), post)
    np.testing.assert_array_equal(first.frames, a)
    assert first.metadata["postprocess"]["film_grain_seed"] == 5


def test_the_hook_applies_wan2gps_order_and_reports_the_output():
    video = moving_bar(5)
    post = PostProcess("rife2", "lanczos1.5", 0.05, 0.3)
    out = apply_postprocess(rendered(video), post)
    assert out.frames.shape == (9, 72, 96, 3) and out.fps == 32
    meta = out.metadata
    assert (meta["frames"], meta["fps"], meta["width"], meta["height"]) == (9, 32, 96, 72)
    assert meta["interpolator"] == "dis_flow"
    assert meta["postprocess"]["generated"] == {"frames": 5, "fps": 16, "width": 64, "height": 48}
    assert meta["postprocess"]["spatial_upsampling"] == "lanczos1.5"
    assert meta["timings"]["denoise"] == 1.0 and meta["timings"]["postprocess"] > 0
    # temporal, then spatial, then grain: the same as doing them by hand in that order
    by_hand, _ = temporal_upsample(video, 2)
    by_hand = add_film_grain(spatial_upsample(by_hand, 96, 72), 0.05, 0.3, seed=7)
    np.testing.assert_array_equal(out.frames, by_hand)
    # one frame: nothing to interpolate, reported
    image = apply_postprocess(rendered(video[:1]), PostProcess(temporal_upsampling="rife4"))
    assert (
        image.frames.shape == (1, 48, 64, 3)
        and "temporal_upsampling_skipped" in image.metadata["postprocess"]
    )


def test_encode_rendered_post_processes_frames_and_already_encoded_artifacts():
    video = moving_bar(5)
    post = PostProcess(temporal_upsampling="rife2", spatial_upsampling="lanczos2")
    artifact = encode_rendered(rendered(video), post)
    frames, fps = decode_video(artifact.data)
    assert frames.shape == (9, 96, 128, 3) and round(fps) == 32
    assert artifact.metadata["timings"]["postprocess"] > 0 and "encode_file" in artifact.metadata["timings"]
    # a multi-GPU replica's output comes encoded: decoded, post-processed, encoded again
    encoded = Artifact(encode_mp4(video, fps=16), "task.mp4", "video/mp4", {"seed": 1, "fps": 16})
    again = encode_rendered(encoded, post)
    frames, fps = decode_video(again.data)
    assert frames.shape == (9, 96, 128, 3) and round(fps) == 32 and again.filename == "task.mp4"
    # nothing asked, or post-processed already by Engine.generate (a multi-GPU replica): untouched
    assert encode_rendered(encoded, None) is encoded
    assert encode_rendered(again, post) is again
    assert decode_video(encode_rendered(rendered(video), PostProcess()).data)[0].shape == video.shape


# ---------------------------------------------------------------------------------------------------------
# Validation and limits
# ---------------------------------------------------------------------------------------------------------


def test_params_accept_wan2gps_values_and_refuse_others_naming_the_key():
    parsed = parse_params("t2v", {"temporal_upsampling": "rife4", "spatial_upsampling": "lanczos1.5",
                                  "film_grain_intensity": 0.1, "film_grain_saturation": 0.2})  # fmt: skip
    assert parsed.postprocess() == PostProcess("rife4", "lanczos1.5", 0.1, 0.2)
    assert parsed.ignored_params() == {}  # honoured, so not reported ignored
    off = parse_params(
        "t2v", {"temporal_upsampling": "", "spatial_upsampling": None, "film_grain_intensity": 0}
    )
    assert not off.postprocess().active and off.ignored_params() == {}
    for key, value in [("temporal_upsampling", "rife8"), ("spatial_upsampling", "lanczos3"),
                       ("spatial_upsampling", 2), ("film_grain_intensity", 1.5),
                       ("film_grain_saturation", -0.1), ("film_grain_intensity", True)]:  # fmt: skip
        with pytest.raises(ValidationError) as error:
            parse_params("t2v", {key: value})
        assert [e["loc"] for e in error.value.errors()] == [(key,)], key
        assert key in str(error.value)
    with pytest.raises(ValidationError, match="spatial_upsampling: 'lanczos2' turns 4000x64 into 8000x128"):
        parse_params("t2v", {"spatial_upsampling": "lanczos2", "resolution": "4000x64"})
    assert postprocess_request("t2v", {"prompt": "x"}) is None
    assert postprocess_request("qwen_image", {"spatial_upsampling": "lanczos2"}) is None  # no such key there
    assert postprocess_request("t2v", {"film_grain_intensity": 0.2}) == PostProcess(film_grain_intensity=0.2)


def test_travel_refuses_them_instead_of_applying_them_per_segment():
    travel = {"images": ["a.png", "b.png"], "prompt": "a walk", "frames": 17, "resolution": "64x48"}
    for key, value in (("spatial_upsampling", "lanczos2"), ("film_grain_intensity", 0.1),
                       ("temporal_upsampling", "rife2")):  # fmt: skip
        with pytest.raises(ValidationError) as error:
            parse_travel({**travel, key: value})
        assert error.value.errors()[0]["loc"][-1] == key
        assert ORCHESTRATION_REFUSED_KEYS[key] in str(error.value)
    # asking for nothing is reported ignored, as before
    plan = parse_travel({**travel, "spatial_upsampling": ""})
    assert "asks for nothing" in plan.ignored_params["spatial_upsampling"]


def test_bad_values_and_oversized_outputs_are_422_at_post(tmp_path: Path):
    with api(tmp_path) as (client, _, _):

        def refused(params: dict) -> dict:
            response = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "x", **params}})
            assert response.status_code == 422, response.text
            return response.json()["detail"][0]

        detail = refused({"spatial_upsampling": "bicubic"})
        assert detail["loc"][-1] == "spatial_upsampling" and "'lanczos1.5', 'lanczos2'" in detail["msg"]
        assert refused({"temporal_upsampling": "film"})["loc"][-1] == "temporal_upsampling"
        assert refused({"film_grain_intensity": 3})["loc"][-1] == "film_grain_intensity"
        # the output limits hold the post-processed size and frames
        detail = refused({"resolution": "2048x1152", "video_length": 5, "spatial_upsampling": "lanczos2"})
        assert detail["loc"] == ["body", "params", "spatial_upsampling"]
        assert "4096x2304" in detail["msg"] and "limits.max_output_pixels" in detail["msg"]
        assert (
            "turns 4000x64 into 8000x128"
            in refused({"resolution": "4000x64", "spatial_upsampling": "lanczos2"})["msg"]
        )
        ok = {"prompt": "x", "resolution": "1280x720", "video_length": 81, "spatial_upsampling": "lanczos1.5",
              "temporal_upsampling": "rife2", "film_grain_intensity": 0.1}  # fmt: skip
        assert client.post("/tasks", json={"task_type": "t2v", "params": ok}).status_code == 201


def test_the_work_estimate_counts_the_post_processed_output(tmp_path: Path):
    from deployments.limits import LimitSettings

    # 64x48 x 9 frames x 2 steps = 55,296; the post-processed output adds 128x96 x 17 frames = 208,896
    limits = LimitSettings(max_work=100_000, max_output_frames=20)
    base = {
        "prompt": "x",
        "model": "tiny-t2v",
        "resolution": "64x48",
        "video_length": 9,
        "num_inference_steps": 2,
    }
    with api(tmp_path, limits=limits) as (client, _, _):
        assert client.post("/tasks", json={"task_type": "t2v", "params": base}).status_code == 201
        big = {**base, "spatial_upsampling": "lanczos2", "temporal_upsampling": "rife2"}
        response = client.post("/tasks", json={"task_type": "t2v", "params": big})
        assert response.status_code == 422, response.text
        msg = response.json()["detail"][0]["msg"]
        assert "post-processed output 128x96 x 17 frames" in msg and "264,192 units" in msg
        # 9 frames x 4 = 33 frames, over max_output_frames
        response = client.post(
            "/tasks", json={"task_type": "t2v", "params": {**base, "temporal_upsampling": "rife4"}}
        )
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["body", "params", "temporal_upsampling"] and "33 frames" in detail["msg"]
        assert "limits.max_output_frames" in detail["msg"]


def test_the_plain_library_engine_post_processes_too(engine):
    params = {
        "prompt": "a cat",
        "resolution": "64x48",
        "video_length": 5,
        "num_inference_steps": 2,
        "seed": 3,
    }
    plain = engine.generate("t2v", params)
    asked = engine.generate(
        "t2v", {**params, "spatial_upsampling": "lanczos1.5", "temporal_upsampling": "rife2"}
    )
    frames, fps = decode_video(asked.data)
    assert frames.shape == (9, 72, 96, 3) and round(fps) == 2 * round(decode_video(plain.data)[1])
    assert asked.metadata["postprocess"]["generated"]["frames"] == 5 and "postprocess" not in plain.metadata
