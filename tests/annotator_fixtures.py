"""Annotator weight files for tests: the real OpenPose and RIFE classes with tiny widths, saved in the
released files' formats into an annotators folder, so they load through the production code path.

``seeing_openpose`` builds a BodyPoseNet whose weights are set by hand so it really finds a person: the
colour of each keypoint's dot in ``SEEING_FIGURE`` passes unchanged through every layer (identity kernels
on three channels), the last heatmap layer lights part k only where the colour is part k's, and the PAFs
point along each limb of the figure. It checks the whole path (BGR input, scaling, padding, upsampling,
peak finding, limb assembly, normalised keypoints) against positions known in advance.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from Wan2GP.annotators import OPENPOSE_FILE, RIFE_FILE
from Wan2GP.openpose import LIMB_PAF, LIMBS, STAGES, BodyPoseNet, BodyPoseWidths, file_state_dict
from Wan2GP.rife import IFNet

TINY_POSE = BodyPoseWidths(vgg=(8, 8, 16, 16), cpm=16, features=8, stage1_hidden=16, stage=8)
SEEING_WIDTHS = BodyPoseWidths(vgg=(4, 4, 4, 4), cpm=4, features=4, stage1_hidden=4, stage=4)
SEEING_SIZE = 256  # 256 px high runs the network at exactly 184 px (no padding)
# A stylised person in COCO-18 order, keypoints at least 32 px apart so that no two share a cell at 1/8.
SEEING_FIGURE = (
    (128, 48), (128, 100), (84, 100), (48, 136), (16, 172), (172, 100), (208, 136), (240, 172),
    (100, 160), (92, 200), (84, 240), (156, 160), (164, 200), (172, 240), (100, 28), (156, 28),
    (72, 48), (184, 48),
)  # fmt: skip
_GREY = 128.0
_RADIUS = 100.0  # the keypoint colours: a circle of hues around mid-grey
_SELECT = 0.985  # a heatmap lights where cos(colour angle difference) > this: only its own colour (20° apart)


def random_openpose(seed: int, widths: BodyPoseWidths = TINY_POSE) -> BodyPoseNet:
    torch.manual_seed(seed)
    net = BodyPoseNet(widths)
    for parameter in net.parameters():  # nn defaults leave tiny nets' outputs near zero: widen the spread
        torch.nn.init.normal_(parameter, std=0.3)
    return net


def save_openpose(net: BodyPoseNet, folder: Path, module_prefix: bool = False) -> Path:
    """``net`` saved as ``folder/body_pose_model.pth`` in the released file's key format."""
    folder.mkdir(parents=True, exist_ok=True)
    state = file_state_dict(net)
    if module_prefix:
        state = {f"module.{key}": value for key, value in state.items()}
    torch.save(state, folder / OPENPOSE_FILE)
    return folder / OPENPOSE_FILE


def random_rife(seed: int, widths: tuple[int, int, int] = (16, 16, 16)) -> IFNet:
    torch.manual_seed(seed)
    return IFNet(widths)


def save_rife(net: IFNet, folder: Path) -> Path:
    """``net`` saved as ``folder/flownet.pkl`` as Wan2GP's file is: DDP keys (``module.``) and a teacher block."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    teacher = IFNet(widths=[8, 8, 8]).block0.state_dict()  # any tensors: the loader must drop them
    state.update({f"module.block_tea.{key}": value for key, value in teacher.items()})
    torch.save(state, folder / RIFE_FILE)
    return folder / RIFE_FILE


def _unit_hue(part: int) -> np.ndarray:
    """Part ``part``'s colour direction (B, G, R), orthogonal to grey."""
    e1 = np.array([1.0, -1.0, 0.0]) / math.sqrt(2)
    e2 = np.array([1.0, 1.0, -2.0]) / math.sqrt(6)
    angle = 2 * math.pi * part / 18
    return math.cos(angle) * e1 + math.sin(angle) * e2


def seeing_figure_image() -> np.ndarray:
    """``SEEING_FIGURE``'s keypoints as coloured dots on black, uint8 RGB. The dots are soft-edged: a sharp
    edge makes the bicubic downscale overshoot, which brightens a colour enough to pass a neighbour's test."""
    image = np.zeros((SEEING_SIZE, SEEING_SIZE, 3), np.uint8)
    for part, (x, y) in enumerate(SEEING_FIGURE):
        bgr = _GREY + _RADIUS * _unit_hue(part)
        cv2.circle(image, (x, y), 8, tuple(float(c) for c in bgr[::-1]), -1)
    return cv2.GaussianBlur(image, (0, 0), 2)


def seeing_openpose(swap_sides: bool = False) -> BodyPoseNet:
    """The hand-set network described above; ``swap_sides`` makes it see the person mirrored (left <-> right)."""
    net = BodyPoseNet(SEEING_WIDTHS)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        modules = dict(net.named_modules())

        def identity(name: str, offset: int = 0) -> None:
            conv = modules[name]
            centre = conv.kernel_size[0] // 2
            for c in range(3):
                conv.weight[c, offset + c, centre, centre] = 1.0

        for name, module in net.model0.named_children():
            if isinstance(module, torch.nn.Conv2d):
                identity(f"model0.{name}")
        net.model0.conv1_1.bias[:3] = 0.5  # x / 256 - 0.5 back to x / 256 >= 0, so the ReLUs keep it
        features_at = 38 + 19
        for stage in range(2, STAGES + 1):
            for branch in (1, 2):
                identity(f"model{stage}_{branch}.Mconv1_stage{stage}_L{branch}", offset=features_at)
                for i in range(2, 7):
                    identity(f"model{stage}_{branch}.Mconv{i}_stage{stage}_L{branch}")
        heat = net.model6_2.Mconv7_stage6_L2
        mirror = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
        gain = 1.0 / (1.0 - _SELECT)
        for part in range(18):
            hue = _unit_hue(mirror[part] if swap_sides else part)
            # features are colour / 256; hue . (colour - grey) / radius = cos(angle to this part's hue)
            heat.weight[part, :3, 0, 0] = torch.tensor(gain * 256 / _RADIUS * hue, dtype=torch.float32)
            heat.bias[part] = -gain * _SELECT  # hue is orthogonal to grey: no grey term
        paf = net.model6_1.Mconv7_stage6_L1
        figure = np.array(SEEING_FIGURE, dtype=float)
        if swap_sides:
            figure = figure[list(mirror)]
        for (a, b), (px, py) in zip(LIMBS, LIMB_PAF, strict=True):
            direction = (figure[b] - figure[a]) / np.linalg.norm(figure[b] - figure[a])
            paf.bias[px], paf.bias[py] = float(direction[0]), float(direction[1])
    return net.eval()
