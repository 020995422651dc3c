"""RIFE frame interpolation: the IFNet_HDv3 network of Wan2GP's ``postprocessing/rife`` in torch.

This is the architecture whose weights Wan2GP ships as ``flownet.pkl`` (and the original Headless-Wan2GP
reads from ``ckpts/flownet.pkl`` for ``rife_interpolate_images``): three IFBlocks refine, coarse to fine
(1/4, 1/2, 1/1 of the image), a bidirectional flow (4 channels: to image 0, to image 1) and a blend mask;
each block runs on both orderings of the pair and the results are averaged; the frame halfway between the
images is the two images warped by the flow and mixed by the sigmoid of the mask. The file also holds a
training-only "teacher" block (``block_tea``), dropped on load.

The network predicts the midpoint only, as in Wan2GP, so other times come from recursive halving: the
frame at k / 2^d is the midpoint of its two neighbours at the level above. Each block's width is read from
the file (``IFNet.from_state_dict``): the real file gives the real network, tests save narrow ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = 3
SCALES = (4, 2, 1)  # each block's working scale (1/4, 1/2, full), Wan2GP's scale_list at scale 1.0
BLOCK_INPUTS = 7 + 4  # two images (3 + 3), the mask (1) and the flow (4)
PAD_TO = 32  # the image is padded to a multiple of this (the coarsest block halves 1/4 twice more)
TRAINING_ONLY = "block_tea."


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True), nn.PReLU(c_out))


class IFBlock(nn.Module):
    """One refinement step: (images + mask, flow) at 1/scale -> (flow delta, mask delta) at full size."""

    def __init__(self, in_planes: int, width: int) -> None:
        super().__init__()
        half = width // 2
        self.conv0 = nn.Sequential(_conv(in_planes, half, 2), _conv(half, width, 2))
        for i in range(4):
            setattr(self, f"convblock{i}", nn.Sequential(_conv(width, width), _conv(width, width)))
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(width, half, 4, 2, 1), nn.PReLU(half), nn.ConvTranspose2d(half, 4, 4, 2, 1)
        )
        self.conv2 = nn.Sequential(
            nn.ConvTranspose2d(width, half, 4, 2, 1), nn.PReLU(half), nn.ConvTranspose2d(half, 1, 4, 2, 1)
        )

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        def resize(t: torch.Tensor, factor: float) -> torch.Tensor:
            return F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False)

        x = resize(x, 1.0 / scale)
        flow = resize(flow, 1.0 / scale) / scale  # flow is in pixels: it shrinks with the image
        features = self.conv0(torch.cat((x, flow), 1))
        for i in range(4):
            features = getattr(self, f"convblock{i}")(features) + features
        flow = resize(self.conv1(features), scale) * scale
        mask = resize(self.conv2(features), scale)
        return flow, mask


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` at x + flow(x) (pixels), bilinear, borders repeated."""
    n, _, height, width = flow.shape
    xs = torch.linspace(-1.0, 1.0, width, device=flow.device).view(1, 1, 1, width).expand(n, 1, height, width)
    ys = (
        torch.linspace(-1.0, 1.0, height, device=flow.device)
        .view(1, 1, height, 1)
        .expand(n, 1, height, width)
    )
    grid = torch.cat((xs, ys), 1) + torch.cat(
        (flow[:, 0:1] / ((width - 1.0) / 2.0), flow[:, 1:2] / ((height - 1.0) / 2.0)), 1
    )
    return F.grid_sample(
        image, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border", align_corners=True
    )


class IFNet(nn.Module):
    """``forward(img0, img1)`` (N, 3, H, W) in [0, 1], H and W multiples of 32 -> the midpoint frame."""

    def __init__(self, widths: Sequence[int] = (90, 90, 90)) -> None:
        super().__init__()
        if len(widths) != BLOCKS:
            raise ValueError(f"IFNet needs {BLOCKS} block widths, got {widths!r}")
        for i, width in enumerate(widths):
            setattr(self, f"block{i}", IFBlock(BLOCK_INPUTS, width))

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        n, _, height, width = img0.shape
        flow = img0.new_zeros((n, 4, height, width))
        mask = img0.new_zeros((n, 1, height, width))
        warped0, warped1 = img0, img1
        for i, scale in enumerate(SCALES):
            block = getattr(self, f"block{i}")
            # Both orderings of the pair; the reversed one's flows swap halves and its mask changes sign.
            f0, m0 = block(torch.cat((warped0, warped1, mask), 1), flow, scale)
            f1, m1 = block(
                torch.cat((warped1, warped0, -mask), 1), torch.cat((flow[:, 2:4], flow[:, :2]), 1), scale
            )
            flow = flow + (f0 + torch.cat((f1[:, 2:4], f1[:, :2]), 1)) / 2
            mask = mask + (m0 - m1) / 2
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> IFNet:
        """The network with the block widths of ``state`` (``flownet.pkl``'s tensors), loaded strictly; the
        training-only teacher block is dropped. A missing or misshapen tensor is a ValueError naming it."""
        state = {key: value for key, value in state.items() if not key.startswith(TRAINING_ONLY)}
        widths = []
        for i in range(BLOCKS):
            weight = state.get(f"block{i}.conv0.1.0.weight")
            if weight is None:
                raise ValueError(
                    f"RIFE weights: block{i}.conv0.1.0.weight is missing; not an IFNet_HDv3 file"
                )
            widths.append(int(weight.shape[0]))
        net = cls(widths)
        expected = net.state_dict()
        for key, tensor in expected.items():
            if key not in state or state[key].shape != tensor.shape:
                got = tuple(state[key].shape) if key in state else None
                raise ValueError(f"RIFE weights: {key} should be {tuple(tensor.shape)}, got {got}")
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ValueError(f"RIFE weights: unexpected tensors {extra[:5]}")
        net.load_state_dict(state)
        return net.eval()


def dyadic_slots(frames: int) -> tuple[int, list[int]]:
    """For ``frames`` evenly spaced times i / (frames - 1): the halving depth d and, per frame, the slot k
    whose time k / 2^d is nearest (exact when frames - 1 is a power of two; never the same slot twice)."""
    depth = max(0, int(np.ceil(np.log2(frames - 1))))
    slots = 2**depth
    return depth, [round(i * slots / (frames - 1)) for i in range(frames)]


class RifeInterpolator:
    """Frames between two images with an IFNet: ``(first, second, frames)`` -> uint8 frames and their times."""

    def __init__(self, net: IFNet, device: str | None = None) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> RifeInterpolator:
        from Wan2GP.annotators import read_state_dict

        return cls(IFNet.from_state_dict(read_state_dict(Path(path))), device)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        height, width = image.shape[:2]
        tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(self.device)
        return F.pad(tensor, (0, -width % PAD_TO, 0, -height % PAD_TO))  # zeros right and below, as Wan2GP

    def __call__(self, first: np.ndarray, second: np.ndarray, frames: int) -> tuple[np.ndarray, list[float]]:
        """``frames`` frames from ``first`` (exact) to ``second`` (exact), both uint8 (H, W, 3) of one size.

        Frame i is the network's frame at the time k / 2^d nearest i / (frames - 1) (``dyadic_slots``);
        returns the frames and those times."""
        if first.shape != second.shape:
            raise ValueError(f"RIFE needs two images of one size, got {first.shape} and {second.shape}")
        depth, wanted = dyadic_slots(frames)
        top = 2**depth
        height, width = first.shape[:2]
        known = {0: self._tensor(first), top: self._tensor(second)}

        def slot(k: int) -> torch.Tensor:
            if k not in known:
                step = k & -k  # k = odd * step: its neighbours one level up are k ± step
                known[k] = self.net(slot(k - step), slot(k + step)).clamp(0.0, 1.0)
            return known[k]

        out = np.empty((frames, height, width, 3), dtype=np.uint8)
        with torch.inference_mode():
            for i, k in enumerate(wanted):
                if k == 0 or k == top:
                    out[i] = first if k == 0 else second
                    continue
                frame = slot(k)[0, :, :height, :width].permute(1, 2, 0).float().cpu().numpy()
                out[i] = np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
        return out, [k / top for k in wanted]


def load_rife(path: str | Path) -> RifeInterpolator:
    """The interpolator of ``path``, loaded once per process per file version."""
    from Wan2GP.annotators import load_cached

    return load_cached(Path(path), RifeInterpolator.load)
