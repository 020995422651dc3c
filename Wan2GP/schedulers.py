"""The original's sample solvers as diffusers schedulers on flow-matching sigmas.

Every solver runs the model's flow-matching schedule shifted by ``flow_shift``
(σ' = shift·σ / (1 + (shift − 1)·σ)), as the original's Wan code does:

- ``euler``: first-order Euler on σ linear from 1 to 1/1000, shifted once, then 0 (the original's
  schedule; diffusers' FlowMatchEulerDiscreteScheduler would shift its last σ twice).
- ``unipc``: UniPC multistep (the Wan 2.1 default; UniPCMultistepScheduler with flow sigmas).
- ``dpm++``: DPM-Solver++ multistep, order 2 (DPMSolverMultistepScheduler with flow sigmas).
- ``dpm++_sde``: its stochastic variant (sde-dpmsolver++); its noise comes from the task's seed.
- ``lcm``: the original's LCM schedule for Lightning LoRAs: Euler steps on σ linear from 1 to 0.003/1.002,
  shifted, at most 8 steps, ending at that last σ rather than 0.
- ``causvid``: Euler on the original's fixed CausVid timesteps (1000, 934, ... 74, at most 9; no shift).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config

from Wan2GP.solvers import SOLVERS

CAUSVID_TIMESTEPS = (1000, 934, 862, 756, 603, 410, 250, 140, 74)
LCM_MAX_STEPS = 8


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FixedScheduleScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler flow-matching steps on the original's ``euler``, ``lcm`` or ``causvid`` sigma schedules."""

    @register_to_config
    def __init__(self, schedule: str = "euler", num_train_timesteps: int = 1000, shift: float = 1.0):
        if schedule not in ("euler", "lcm", "causvid"):
            raise ValueError(f"schedule must be 'euler', 'lcm' or 'causvid', got {schedule!r}")
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs) -> None:
        sigmas = schedule_sigmas(self.config.schedule, num_inference_steps, self.config.shift)
        self.num_inference_steps = len(sigmas) - 1
        self.sigmas = torch.from_numpy(sigmas).to(device=device, dtype=torch.float32)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._step_index = None
        self._begin_index = None


def schedule_sigmas(schedule: str, steps: int, shift: float) -> np.ndarray:
    """σ of each step plus the final σ, for the fixed schedules."""
    if schedule == "euler":
        sigmas = shift_sigmas(np.linspace(1.0, 1.0 / 1000, steps), shift)
        return np.append(sigmas, 0.0).astype(np.float32)
    if schedule == "causvid":
        timesteps = np.array(CAUSVID_TIMESTEPS[:steps], dtype=np.float64)
        return np.append(timesteps / 1000.0, 0.0).astype(np.float32)
    steps = min(steps, LCM_MAX_STEPS)
    sigma_min = 0.003 / 1.002
    t = np.linspace(0.0, 1.0, steps + 1)
    return shift_sigmas(sigma_min + (1.0 - sigma_min) * (1.0 - t), shift).astype(np.float32)


def steps_run(solver: str | None, steps: int) -> int:
    """How many denoising steps ``solver`` runs when asked for ``steps`` (lcm and causvid cap them)."""
    if solver == "lcm":
        return min(steps, LCM_MAX_STEPS)
    if solver == "causvid":
        return min(steps, len(CAUSVID_TIMESTEPS))
    return steps


def make_scheduler(base, solver: str | None, flow_shift: float | None):
    """A fresh scheduler for one task: ``solver`` (None = the model's own scheduler class) with
    ``flow_shift`` (None = the model's own shift), built from the model's scheduler config."""
    config = dict(base.config)
    if solver is None:
        cls = type(base)
        if flow_shift is None:
            return cls.from_config(config)
        if issubclass(cls, FlowMatchEulerDiscreteScheduler):
            return cls.from_config(config, shift=flow_shift, use_dynamic_shifting=False)
        return cls.from_config(config, flow_shift=flow_shift)
    shift = flow_shift
    if shift is None:  # the model's own shift, whichever way its scheduler spells it
        shift = config.get("flow_shift", config.get("shift", 1.0))
    num_train = config.get("num_train_timesteps", 1000)
    if solver == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=num_train,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
    if solver in ("dpm++", "dpm++_sde"):
        return DPMSolverMultistepScheduler(
            num_train_timesteps=num_train,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            algorithm_type="sde-dpmsolver++" if solver == "dpm++_sde" else "dpmsolver++",
        )
    if solver in ("euler", "lcm", "causvid"):
        return FixedScheduleScheduler(schedule=solver, num_train_timesteps=num_train, shift=shift)
    raise ValueError(f"sample_solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
