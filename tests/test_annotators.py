"""OpenPose and RIFE from a local annotators folder ($HWGP_ANNOTATORS_DIR), and the weight-free fallbacks.

The weight files are the real classes with tiny widths, saved in the released files' formats and loaded
through the production path (``dag.pose.pose_estimator``, ``dag.interpolate.rife_interpolate_images``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from annotator_fixtures import (
    SEEING_FIGURE,
    SEEING_SIZE,
    random_openpose,
    random_rife,
    save_openpose,
    save_rife,
    seeing_figure_image,
    seeing_openpose,
)

from dag.interpolate import dis_flow_interpolate, rife_interpolate_images
from dag.pose import KEYPOINTS, detect_pose, detect_poses, generate_openpose, pose_estimator, render_people
from dag.vace_control import prepare_vace_params
from Wan2GP.annotators import ANNOTATORS_ENV, OPENPOSE_FILE
from Wan2GP.openpose import BodyPoseNet, OpenposeBody, file_state_dict
from Wan2GP.rife import IFNet, RifeInterpolator, dyadic_slots


@pytest.fixture(autouse=True)
def no_annotators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no annotators folder configured (a developer's own setting must not leak in)."""
    monkeypatch.delenv(ANNOTATORS_ENV, raising=False)


def use_folder(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    monkeypatch.setenv(ANNOTATORS_ENV, str(folder))


# ---------------------------------------------------------------------------------------------------------
# OpenPose
# ---------------------------------------------------------------------------------------------------------


def test_openpose_network_has_the_released_layout():
    with torch.device("meta"):  # the full-width network without allocating its 52 M parameters
        net = BodyPoseNet()
    state = file_state_dict(net)
    assert sum(t.numel() for t in state.values()) == 52_311_446  # body_pose_model.pth: 209 MB of float32
    assert len(state) == 184 and "conv1_1.weight" in state and "Mconv7_stage6_L2.bias" in state
    assert tuple(state["Mconv1_stage2_L1.weight"].shape) == (128, 185, 7, 7)  # 38 PAFs + 19 maps + 128
    assert tuple(state["conv5_5_CPM_L2.weight"].shape) == (19, 512, 1, 1)


def test_openpose_finds_the_person_through_the_weight_file(tmp_path, monkeypatch):
    save_openpose(seeing_openpose(), tmp_path)
    use_folder(monkeypatch, tmp_path)
    estimator = pose_estimator()
    assert estimator.name == "openpose"
    image = seeing_figure_image()
    pose = detect_pose(image)
    assert pose is not None and pose.shape == (len(KEYPOINTS), 3)
    # every keypoint where it was drawn (to the heatmaps' 1/8 resolution), in [0, 1] image coordinates
    np.testing.assert_allclose(pose[:, :2] * SEEING_SIZE, SEEING_FIGURE, atol=5)
    assert np.all(pose[:, 2] > 0.5) and np.all(pose[:, 2] <= 1.0)

    frames, meta = generate_openpose(image)
    assert meta["pose_estimator"] == "openpose" and meta["frames_with_pose"] == 1
    assert frames.shape == (1, SEEING_SIZE, SEEING_SIZE, 3)
    np.testing.assert_array_equal(frames[0], render_people([pose], SEEING_SIZE, SEEING_SIZE))


def test_openpose_output_depends_on_the_weights(tmp_path, monkeypatch):
    """Weights that see the person mirrored give the mirrored skeleton, through the same file and loader."""
    save_openpose(seeing_openpose(swap_sides=True), tmp_path / "mirrored")
    use_folder(monkeypatch, tmp_path / "mirrored")
    mirrored = detect_pose(seeing_figure_image())
    assert mirrored is not None
    right, left = KEYPOINTS.index("right_wrist"), KEYPOINTS.index("left_wrist")
    np.testing.assert_allclose(mirrored[right, :2] * SEEING_SIZE, SEEING_FIGURE[left], atol=5)
    np.testing.assert_allclose(mirrored[left, :2] * SEEING_SIZE, SEEING_FIGURE[right], atol=5)

    save_openpose(seeing_openpose(), tmp_path / "plain")
    use_folder(monkeypatch, tmp_path / "plain")
    plain_frames, _ = generate_openpose(seeing_figure_image())
    use_folder(monkeypatch, tmp_path / "mirrored")
    mirrored_frames, _ = generate_openpose(seeing_figure_image())
    assert (plain_frames != mirrored_frames).any(axis=-1).mean() > 0.01  # limbs change colour with sides


def test_openpose_separates_two_people(tmp_path, monkeypatch):
    save_openpose(seeing_openpose(), tmp_path)
    use_folder(monkeypatch, tmp_path)
    image = np.concatenate([seeing_figure_image(), seeing_figure_image()], axis=1)  # 256 x 512, side by side
    people = detect_poses(image)
    assert len(people) == 2
    found = sorted((pose[:, :2] * (512, 256) for pose in people), key=lambda points: points[1, 0])
    np.testing.assert_allclose(found[0], SEEING_FIGURE, atol=5)
    np.testing.assert_allclose(found[1], np.array(SEEING_FIGURE) + (256, 0), atol=5)
    frames, meta = generate_openpose(image)
    assert meta["frames_with_pose"] == 1 and frames.shape == (1, 256, 512, 3)
    assert frames[0, :, :256].any() and frames[0, :, 256:].any()  # both skeletons drawn


def test_random_openpose_weights_run_and_differ(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    first = OpenposeBody.load(save_openpose(random_openpose(1), tmp_path / "one"), device="cpu")
    second = OpenposeBody.load(save_openpose(random_openpose(2), tmp_path / "two"), device="cpu")
    heatmaps, pafs = first.maps(image)
    assert heatmaps.shape == (64, 64, 19) and pafs.shape == (64, 64, 38)
    assert not np.allclose(heatmaps, second.maps(image)[0])
    for pose in first(image):  # whatever random weights find is in the pose format
        assert pose.shape == (18, 3) and np.all((pose >= 0) & (pose <= 1))
    # a DDP-saved copy (module. prefix) loads to the same network
    prefixed = save_openpose(random_openpose(1), tmp_path / "ddp", module_prefix=True)
    np.testing.assert_array_equal(OpenposeBody.load(prefixed, device="cpu").maps(image)[0], heatmaps)


def test_a_broken_openpose_file_is_named(tmp_path, monkeypatch):
    state = file_state_dict(random_openpose(0))
    del state["Mconv3_stage4_L2.weight"]
    torch.save(state, tmp_path / OPENPOSE_FILE)
    use_folder(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="Mconv3_stage4_L2.weight"):
        pose_estimator()


def test_without_weights_the_silhouette_estimator_runs_and_is_named(tmp_path, monkeypatch):
    assert pose_estimator().name == "silhouette_heuristic"
    use_folder(monkeypatch, tmp_path)  # a folder without body_pose_model.pth
    assert pose_estimator().name == "silhouette_heuristic"
    _, meta = generate_openpose(seeing_figure_image())
    assert meta["pose_estimator"] == "silhouette_heuristic"


def test_vace_pose_letter_uses_and_reports_the_installed_estimator(tmp_path, monkeypatch):
    guide = np.stack([seeing_figure_image()] * 3)
    params = {"prompt": "x", "video_guide": guide, "video_prompt_type": "PV", "resolution": "256x256"}
    _, report = prepare_vace_params(params)
    assert report["pose_estimator"] == "silhouette_heuristic"  # coloured dots: not a silhouette it reads

    save_openpose(seeing_openpose(), tmp_path)
    use_folder(monkeypatch, tmp_path)
    ready, report = prepare_vace_params(params)
    assert report["control_process"] == "pose" and report["pose_estimator"] == "openpose"
    expected = render_people(detect_poses(seeing_figure_image()), SEEING_SIZE, SEEING_SIZE)
    assert ready["video_guide"].shape == (3, SEEING_SIZE, SEEING_SIZE, 3)
    for frame in ready["video_guide"]:
        np.testing.assert_array_equal(frame, expected)
    _, canny = prepare_vace_params({**params, "video_prompt_type": "EV"})
    assert "pose_estimator" not in canny  # only a pose guide names it


# ---------------------------------------------------------------------------------------------------------
# RIFE
# ---------------------------------------------------------------------------------------------------------


def moving_square(shift: int) -> np.ndarray:
    image = np.full((48, 64, 3), (30, 60, 90), np.uint8)  # not a multiple of 32: padded and cropped back
    image[14:30, 8 + shift : 24 + shift] = (250, 240, 40)
    return image


def test_rife_interpolates_with_the_weight_file(tmp_path, monkeypatch):
    net = random_rife(0)
    save_rife(net, tmp_path)  # Wan2GP's format: module. keys and a training-only teacher block
    use_folder(monkeypatch, tmp_path)
    first, second = moving_square(0), moving_square(24)
    frames, meta = rife_interpolate_images(first, second, 5)
    assert meta["interpolator"] == "rife" and meta["times"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[0], first)
    np.testing.assert_array_equal(frames[-1], second)

    # the frames are the network's: the midpoint, then the midpoint of the first half
    reference = RifeInterpolator(net, device="cpu")
    with torch.inference_mode():
        a, b = reference._tensor(first), reference._tensor(second)
        middle = net(a, b).clamp(0, 1)
        quarter = net(a, middle).clamp(0, 1)
    for frame, expected in ((frames[2], middle), (frames[1], quarter)):
        expected = np.rint(expected[0, :, :48, :64].permute(1, 2, 0).numpy() * 255)
        assert np.abs(frame.astype(int) - expected).max() <= 1
    assert np.abs(frames[2].astype(int) - dis_flow_interpolate(first, second, 5)[2]).mean() > 1


def test_rife_output_depends_on_the_weights(tmp_path, monkeypatch):
    first, second = moving_square(0), moving_square(24)
    middles = []
    for seed in (1, 2):
        save_rife(random_rife(seed), tmp_path / str(seed))
        use_folder(monkeypatch, tmp_path / str(seed))
        frames, _ = rife_interpolate_images(first, second, 3)
        middles.append(frames[1].astype(int))
    assert np.abs(middles[0] - middles[1]).mean() > 1


def test_rife_times_for_any_frame_count():
    assert dyadic_slots(2) == (0, [0, 1])
    assert dyadic_slots(9) == (3, list(range(9)))
    depth, slots = dyadic_slots(16)  # 15 intervals on 16 slots: nearest, each once
    assert depth == 4 and len(set(slots)) == 16 and slots[0] == 0 and slots[-1] == 16
    assert all(abs(k / 16 - i / 15) <= 1 / 32 for i, k in enumerate(slots))


def test_a_broken_rife_file_is_named(tmp_path, monkeypatch):
    state = {f"module.{k}": v for k, v in random_rife(0).state_dict().items()}
    state["module.block1.conv1.0.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "flownet.pkl")
    use_folder(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="block1.conv1.0.weight"):
        rife_interpolate_images(moving_square(0), moving_square(8), 3)


def test_without_rife_weights_dis_flow_runs_and_is_named(tmp_path, monkeypatch):
    use_folder(monkeypatch, tmp_path)
    frames, meta = rife_interpolate_images(moving_square(0), moving_square(8), 4)
    assert meta["interpolator"] == "dis_flow" and "times" not in meta
    np.testing.assert_array_equal(frames, dis_flow_interpolate(moving_square(0), moving_square(8), 4))


def test_ifnet_has_wan2gp_layout():
    with torch.device("meta"):
        net = IFNet()
    state = net.state_dict()
    assert tuple(state["block0.conv0.0.0.weight"].shape) == (45, 11, 3, 3)  # 7 + 4 inputs, c // 2 = 45
    assert tuple(state["block2.conv1.2.weight"].shape) == (45, 4, 4, 4)  # the 4-channel flow head
    assert tuple(state["block1.conv2.2.weight"].shape) == (45, 1, 4, 4)  # the mask head
    assert not any(key.startswith("block_tea") for key in state)
