"""The original's sample solvers on tiny models: each runs, each gives its own output, flow_shift counts."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from Wan2GP.schedulers import make_scheduler, schedule_sigmas
from Wan2GP.solvers import SOLVERS
from Wan2GP.video import decode_video

pytest_plugins = ["engine_fixtures"]


def _frames(artifact) -> np.ndarray:
    return decode_video(artifact.data)[0].astype(np.int16)


def test_every_solver_runs_and_gives_its_own_output(engine):
    params = {"model": "tiny-t2v", "prompt": "a cat", "seed": 4, "num_inference_steps": 4}
    outputs = {}
    for solver in SOLVERS:
        artifact = engine.generate("t2v", {**params, "sample_solver": solver})
        assert artifact.metadata["sample_solver"] == solver
        outputs[solver] = _frames(artifact)
    for i, a in enumerate(SOLVERS):
        for b in SOLVERS[i + 1 :]:
            assert np.abs(outputs[a] - outputs[b]).mean() > 0.05, (a, b)
    # the stochastic solver draws its noise from the task's seed
    again = engine.generate("t2v", {**params, "sample_solver": "dpm++_sde"})
    np.testing.assert_array_equal(_frames(again), outputs["dpm++_sde"])


def test_flow_shift_changes_the_schedule_of_every_shifted_solver(engine):
    params = {"model": "tiny-t2v", "prompt": "a cat", "seed": 4, "num_inference_steps": 3}
    for solver in ("euler", "unipc", "dpm++", "lcm"):
        low = engine.generate("t2v", {**params, "sample_solver": solver, "flow_shift": 1.0})
        high = engine.generate("t2v", {**params, "sample_solver": solver, "flow_shift": 8.0})
        assert np.abs(_frames(low) - _frames(high)).mean() > 0.05, solver


def test_fixed_schedules_follow_the_original(engine):
    sigmas = schedule_sigmas("causvid", 4, shift=5.0)  # causvid ignores the shift
    np.testing.assert_allclose(sigmas, [1.0, 0.934, 0.862, 0.756, 0.0], rtol=1e-6)
    lcm = schedule_sigmas("lcm", 12, shift=1.0)  # at most 8 steps, ending at 0.003/1.002
    assert len(lcm) == 9 and lcm[0] == pytest.approx(1.0) and lcm[-1] == pytest.approx(0.003 / 1.002)
    artifact = engine.generate(
        "t2v", {"model": "tiny-t2v", "sample_solver": "lcm", "num_inference_steps": 12}
    )
    assert artifact.metadata["steps"] == 8
    scheduler = make_scheduler(engine._base_scheduler, "euler", 5.0)  # linspace(1000, 1), shifted once
    scheduler.set_timesteps(3)
    expected = np.linspace(1.0, 1 / 1000, 3)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), 5 * expected / (1 + 4 * expected), rtol=1e-5)


def test_unknown_solver_lists_the_valid_ones():
    from Wan2GP.params import parse_params

    with pytest.raises(ValidationError) as error:
        parse_params("t2v", {"sample_solver": "ddim"})
    message = str(error.value)
    assert all(name in message for name in SOLVERS)
