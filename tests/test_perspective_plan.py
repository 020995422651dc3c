"""different_perspective_orchestrator's params: the original's perspective_type, nothing silently ignored."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dag.perspective_plan import PerspectiveParams, validate


def test_perspective_type_pose_is_honoured_and_depth_refused():
    assert PerspectiveParams.model_validate({"input_image_path": "a.png"}).perspective_type == "pose"
    with pytest.raises(ValidationError) as caught:
        validate({"input_image_path": "a.png", "perspective_type": "depth"})
    error = caught.value.errors()[0]
    assert error["loc"] == ("perspective_type",) and "depth model" in error["msg"]


def test_unknown_keys_are_reported_as_ignored():
    parsed = PerspectiveParams.model_validate({"input_image_path": "a.png", "prompt": "x", "vibe": "calm"})
    assert parsed.ignored_params() == {"vibe": "not used by different_perspective_orchestrator"}
