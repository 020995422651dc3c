"""Where annotator weights (OpenPose body, RIFE) are found: one local folder, never a download.

``$HWGP_ANNOTATORS_DIR`` names a folder holding the original files under their original names:

    body_pose_model.pth   OpenPose body (the CMU model the ControlNet annotators use)  -> Wan2GP/openpose.py
    flownet.pkl           RIFE IFNet_HDv3 (the file Wan2GP's ckpts/ holds)              -> Wan2GP/rife.py

A file that is absent means its weight-free stand-in runs (``dag/pose.py``, ``dag/interpolate.py``) and the
task's result names which one ran. The variable is read where the work runs (a Ray worker), so set it on
every node (or in the Serve application's ``runtime_env``), as ``WAN2GP_DEPTH_MODEL_DIR`` for the depth model.
Models are loaded once per process per file version (path, size, modification time).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ANNOTATORS_ENV = "HWGP_ANNOTATORS_DIR"
OPENPOSE_FILE = "body_pose_model.pth"
RIFE_FILE = "flownet.pkl"

T = TypeVar("T")
_CACHE: dict[tuple[str, int, int], Any] = {}
_LOCK = threading.Lock()


def annotators_dir() -> Path | None:
    """The configured annotators folder (``$HWGP_ANNOTATORS_DIR``), or None when unset or not a folder."""
    folder = os.environ.get(ANNOTATORS_ENV, "").strip()
    return Path(folder) if folder and os.path.isdir(folder) else None


def annotator_file(name: str) -> Path | None:
    """``name`` inside the annotators folder, if it is there."""
    folder = annotators_dir()
    if folder is None:
        return None
    path = folder / name
    return path if path.is_file() else None


def load_cached(path: Path, loader: Callable[[Path], T]) -> T:
    """``loader(path)``, once per process per version of the file (a replaced file is loaded again)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = loader(path)
        return _CACHE[key]


def read_state_dict(path: Path) -> dict[str, Any]:
    """A torch state dict from ``path`` (tensors only, on CPU), with DDP's ``module.`` prefix removed."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    return {key.removeprefix("module."): value for key, value in state.items()}
