"""OpenPose body estimator: the CMU 18-keypoint body model in torch and its heatmap + PAF decoding.

The network is the one the ControlNet OpenPose annotator runs (``body_pose_model.pth``): a VGG-19 front
(conv1_1 … conv4_2, three max pools, so outputs are at 1/8 of the input), two CPM convolutions, then six
stages of two branches each: L1 predicts 38 part-affinity-field channels (19 limbs × x, y) and L2 predicts
19 heatmaps (18 keypoints + background). Every stage after the first sees both branches' previous
outputs concatenated with the front's features. Layer names are the file's, so its tensors load as they are.

Channel widths are read from the weight file (``BodyPoseNet.from_state_dict``): the real file gives the real
network; tests save the same architecture with narrow layers and load it through the same code.

Decoding follows the annotator: the image (BGR, as the model was trained) is scaled to 184 px high, padded
to a multiple of 8 with grey, normalised to x / 256 - 0.5; the maps are upsampled back to the image; a
keypoint is a local maximum of the smoothed heatmap above 0.1; limbs join keypoint candidates whose PAF
agrees along the segment; people are grown greedily from the strongest limbs and kept with at least 4
keypoints and a mean score of at least 0.4.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

KEYPOINT_COUNT = 18
PAF_CHANNELS = 38
HEATMAP_CHANNELS = 19
STAGES = 6
# Limbs as (keypoint a, keypoint b) in COCO-18 order (0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right
# leg, 11-13 left leg, 14/15 eyes, 16/17 ears) and the PAF channels (x, y) trained for each.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
LIMB_PAF = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
    (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
BOX_SIZE = 368
SCALE = 0.5  # the annotator's single search scale: the image is run at 184 px high
STRIDE = 8
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1
PAF_THRESHOLD = 0.05
PAF_SAMPLES = 10
MIN_PARTS = 4
MIN_MEAN_SCORE = 0.4


@dataclass(frozen=True)
class BodyPoseWidths:
    """Channel widths of the network; the defaults are the released model's."""

    vgg: tuple[int, int, int, int] = (64, 128, 256, 512)  # conv1_x, conv2_x, conv3_x, conv4_1/conv4_2
    cpm: int = 256  # conv4_3_CPM
    features: int = 128  # conv4_4_CPM: the features every stage sees
    stage1_hidden: int = 512  # conv5_4_CPM_Lx
    stage: int = 128  # Mconv1…6 of stages 2-6


def _conv(name: str, c_in: int, c_out: int, kernel: int, relu: bool) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [(name, nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2))]
    if relu:
        layers.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return layers


class BodyPoseNet(nn.Module):
    """The CMU body pose network: ``forward(x)`` -> (PAFs (N, 38, H/8, W/8), heatmaps (N, 19, H/8, W/8))."""

    def __init__(self, widths: BodyPoseWidths = BodyPoseWidths()) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths.vgg
        front: list[tuple[str, nn.Module]] = []
        front += _conv("conv1_1", 3, c1, 3, True) + _conv("conv1_2", c1, c1, 3, True)
        front.append(("pool1_stage1", nn.MaxPool2d(2, 2)))
        front += _conv("conv2_1", c1, c2, 3, True) + _conv("conv2_2", c2, c2, 3, True)
        front.append(("pool2_stage1", nn.MaxPool2d(2, 2)))
        front += _conv("conv3_1", c2, c3, 3, True)
        for i in (2, 3, 4):
            front += _conv(f"conv3_{i}", c3, c3, 3, True)
        front.append(("pool3_stage1", nn.MaxPool2d(2, 2)))
        front += _conv("conv4_1", c3, c4, 3, True) + _conv("conv4_2", c4, c4, 3, True)
        front += _conv("conv4_3_CPM", c4, widths.cpm, 3, True)
        front += _conv("conv4_4_CPM", widths.cpm, widths.features, 3, True)
        self.model0 = nn.Sequential(OrderedDict(front))

        f, hidden, mid = widths.features, widths.stage1_hidden, widths.stage
        for branch, out in ((1, PAF_CHANNELS), (2, HEATMAP_CHANNELS)):
            layers = _conv(f"conv5_1_CPM_L{branch}", f, f, 3, True)
            layers += _conv(f"conv5_2_CPM_L{branch}", f, f, 3, True)
            layers += _conv(f"conv5_3_CPM_L{branch}", f, f, 3, True)
            layers += _conv(f"conv5_4_CPM_L{branch}", f, hidden, 1, True)
            layers += _conv(f"conv5_5_CPM_L{branch}", hidden, out, 1, False)
            setattr(self, f"model1_{branch}", nn.Sequential(OrderedDict(layers)))
        stage_in = PAF_CHANNELS + HEATMAP_CHANNELS + f
        for stage in range(2, STAGES + 1):
            for branch, out in ((1, PAF_CHANNELS), (2, HEATMAP_CHANNELS)):
                name = f"stage{stage}_L{branch}"
                layers = _conv(f"Mconv1_{name}", stage_in, mid, 7, True)
                for i in range(2, 6):
                    layers += _conv(f"Mconv{i}_{name}", mid, mid, 7, True)
                layers += _conv(f"Mconv6_{name}", mid, mid, 1, True)
                # The released model's list of ReLU-free layers names Mconv7_stage6_L1 twice and misses
                # Mconv7_stage6_L2, so its final heatmaps pass through a ReLU: kept, to match its outputs.
                last_relu = stage == STAGES and branch == 2
                layers += _conv(f"Mconv7_{name}", mid, out, 1, last_relu)
                setattr(self, f"model{stage}_{branch}", nn.Sequential(OrderedDict(layers)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model0(x)
        pafs, heatmaps = self.model1_1(features), self.model1_2(features)
        for stage in range(2, STAGES + 1):
            joined = torch.cat([pafs, heatmaps, features], 1)
            pafs = getattr(self, f"model{stage}_1")(joined)
            heatmaps = getattr(self, f"model{stage}_2")(joined)
        return pafs, heatmaps

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> BodyPoseNet:
        """The network with the widths of ``state`` (the file's keys, with or without ``modelX.``), loaded
        strictly: a missing, extra or misshapen tensor is a ValueError naming it."""
        flat = {key.split(".", 1)[1] if key.startswith("model") else key: v for key, v in state.items()}

        def out_channels(layer: str) -> int:
            weight = flat.get(f"{layer}.weight")
            if weight is None:
                raise ValueError(f"OpenPose weights: {layer}.weight is missing; not a body_pose_model file")
            return int(weight.shape[0])

        widths = BodyPoseWidths(
            vgg=tuple(out_channels(name) for name in ("conv1_1", "conv2_1", "conv3_1", "conv4_1")),  # type: ignore[arg-type]
            cpm=out_channels("conv4_3_CPM"),
            features=out_channels("conv4_4_CPM"),
            stage1_hidden=out_channels("conv5_4_CPM_L1"),
            stage=out_channels("Mconv1_stage2_L1"),
        )
        net = cls(widths)
        # The file's keys are the layer names without the module prefix (model0.conv1_1.weight -> conv1_1.weight).
        expected = net.state_dict()
        mapped = {}
        for key, tensor in expected.items():
            source = flat.get(key.split(".", 1)[1])
            if source is None or source.shape != tensor.shape:
                got = None if source is None else tuple(source.shape)
                raise ValueError(f"OpenPose weights: {key} should be {tuple(tensor.shape)}, got {got}")
            mapped[key] = source
        if len(flat) != len(expected):
            extra = sorted(set(flat) - {key.split(".", 1)[1] for key in expected})
            raise ValueError(f"OpenPose weights: unexpected tensors {extra[:5]}")
        net.load_state_dict(mapped)
        return net.eval()


def file_state_dict(net: BodyPoseNet) -> dict[str, torch.Tensor]:
    """``net``'s tensors keyed as in ``body_pose_model.pth`` (layer names, no module prefix)."""
    return {key.split(".", 1)[1]: tensor for key, tensor in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Decoding: heatmaps + PAFs -> people
# ---------------------------------------------------------------------------------------------------------


def find_peaks(heatmaps: np.ndarray) -> list[np.ndarray]:
    """Keypoint candidates per part: rows of (x, y, score) where the smoothed heatmap (H, W, >=18) is a
    local maximum over its 4 neighbours and above ``PEAK_THRESHOLD``; the score is the raw heatmap's."""
    peaks = []
    for part in range(KEYPOINT_COUNT):
        raw = np.ascontiguousarray(heatmaps[:, :, part], dtype=np.float64)
        # sigma 3, truncated at 4 sigma with reflected borders: scipy's gaussian_filter, which OpenPose uses
        smooth = cv2.GaussianBlur(raw, (25, 25), 3, borderType=cv2.BORDER_REFLECT)
        padded = np.pad(smooth, 1, constant_values=0)
        centre = padded[1:-1, 1:-1]
        is_peak = (
            (centre >= padded[:-2, 1:-1])
            & (centre >= padded[2:, 1:-1])
            & (centre >= padded[1:-1, :-2])
            & (centre >= padded[1:-1, 2:])
            & (centre > PEAK_THRESHOLD)
        )
        ys, xs = np.nonzero(is_peak)
        peaks.append(np.stack([xs, ys, raw[ys, xs]], axis=1) if len(xs) else np.zeros((0, 3)))
    return peaks


def _limb_connections(
    a: np.ndarray, b: np.ndarray, paf: np.ndarray, image_height: int
) -> list[tuple[int, int, float]]:
    """(i, j, score) of candidates a[i] - b[j] joined by this limb, strongest first, each candidate once."""
    height, width = paf.shape[:2]
    candidates = []
    for i, (xa, ya, _) in enumerate(a):
        for j, (xb, yb, _) in enumerate(b):
            length = max(0.001, math.hypot(xb - xa, yb - ya))
            direction = np.array([xb - xa, yb - ya]) / length
            xs = np.clip(np.rint(np.linspace(xa, xb, PAF_SAMPLES)).astype(int), 0, width - 1)
            ys = np.clip(np.rint(np.linspace(ya, yb, PAF_SAMPLES)).astype(int), 0, height - 1)
            alignment = paf[ys, xs] @ direction
            # long limbs (over half the image height) are penalised
            score = float(alignment.mean()) + min(0.5 * image_height / length - 1, 0)
            if np.count_nonzero(alignment > PAF_THRESHOLD) > 0.8 * PAF_SAMPLES and score > 0:
                candidates.append((i, j, score))
    candidates.sort(key=lambda c: c[2], reverse=True)
    used_a, used_b, chosen = set(), set(), []
    for i, j, score in candidates:
        if i not in used_a and j not in used_b:
            chosen.append((i, j, score))
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= min(len(a), len(b)):
                break
    return chosen


def decode_people(heatmaps: np.ndarray, pafs: np.ndarray) -> list[np.ndarray]:
    """People found in full-resolution maps: heatmaps (H, W, >=18), PAFs (H, W, 38).

    Returns (18, 3) arrays of x, y normalised to [0, 1] of the width and height and the keypoint's heatmap
    score as its confidence (0 = missing), the most confident person first.
    """
    height, width = heatmaps.shape[:2]
    peaks = find_peaks(heatmaps)
    # A person: the candidate index per keypoint (-1 = none), the sum of scores and the keypoint count.
    people: list[tuple[np.ndarray, list[float]]] = []
    for k, ((part_a, part_b), (px, py)) in enumerate(zip(LIMBS, LIMB_PAF, strict=True)):
        a, b = peaks[part_a], peaks[part_b]
        if not len(a) or not len(b):
            continue
        for i, j, limb_score in _limb_connections(a, b, pafs[:, :, [px, py]], height):
            owners = [n for n, (parts, _) in enumerate(people) if parts[part_a] == i or parts[part_b] == j]
            if len(owners) == 1:
                parts, totals = people[owners[0]]
                if parts[part_b] != j:
                    parts[part_b] = j
                    totals[0] += b[j, 2] + limb_score
                    totals[1] += 1
            elif len(owners) == 2:
                (first, first_totals), (second, second_totals) = people[owners[0]], people[owners[1]]
                if not np.any((first >= 0) & (second >= 0)):  # disjoint halves of one person: merge
                    merged = np.where(first >= 0, first, second)
                    totals = [
                        first_totals[0] + second_totals[0] + limb_score,
                        first_totals[1] + second_totals[1],
                    ]
                    people[owners[0]] = (merged, totals)
                    del people[owners[1]]
                else:
                    first[part_b] = j
                    first_totals[0] += b[j, 2] + limb_score
                    first_totals[1] += 1
            elif k < 17:  # the two ear-shoulder limbs never start a person
                parts = np.full(KEYPOINT_COUNT, -1)
                parts[part_a], parts[part_b] = i, j
                people.append((parts, [a[i, 2] + b[j, 2] + limb_score, 2]))
    kept = [
        (parts, total / count)
        for parts, (total, count) in people
        if count >= MIN_PARTS and total / count >= MIN_MEAN_SCORE
    ]
    kept.sort(key=lambda person: person[1], reverse=True)
    poses = []
    for parts, _ in kept:
        pose = np.zeros((KEYPOINT_COUNT, 3))
        for part, index in enumerate(parts):
            if index >= 0:
                x, y, score = peaks[part][index]
                pose[part] = (x / width, y / height, min(1.0, max(float(score), 1e-3)))
        poses.append(pose)
    return poses


class OpenposeBody:
    """The body estimator: ``(H, W, 3)`` uint8 RGB image -> people as (18, 3) poses (``decode_people``)."""

    def __init__(self, net: BodyPoseNet, device: str | None = None) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> OpenposeBody:
        from Wan2GP.annotators import read_state_dict

        return cls(BodyPoseNet.from_state_dict(read_state_dict(Path(path))), device)

    def maps(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's (heatmaps (H, W, 19), PAFs (H, W, 38)) for an RGB image, at the image's size."""
        height, width = image.shape[:2]
        scale = BOX_SIZE * SCALE / height
        resized = cv2.resize(image[:, :, ::-1], (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        rows, cols = resized.shape[:2]
        pad_rows, pad_cols = -rows % STRIDE, -cols % STRIDE
        padded = cv2.copyMakeBorder(
            resized, 0, pad_rows, 0, pad_cols, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
        )
        batch = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None]
        with torch.inference_mode():
            pafs, heatmaps = self.net(batch.to(self.device))

        def full_size(maps: torch.Tensor) -> np.ndarray:
            array = maps[0].permute(1, 2, 0).float().cpu().numpy()
            array = cv2.resize(array, (0, 0), fx=STRIDE, fy=STRIDE, interpolation=cv2.INTER_CUBIC)
            array = array[:rows, :cols]
            return cv2.resize(array, (width, height), interpolation=cv2.INTER_CUBIC)

        return full_size(heatmaps), full_size(pafs)

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        heatmaps, pafs = self.maps(image)
        return decode_people(heatmaps, pafs)


def load_openpose(path: str | Path) -> OpenposeBody:
    """The estimator of ``path``, loaded once per process per file version."""
    from Wan2GP.annotators import load_cached

    return load_cached(Path(path), OpenposeBody.load)
