"""Denoising phases, the original's way: guidance, LoRA multipliers and (on two-expert Wan 2.2 models) the
expert change at phase boundaries, all inside one denoising loop.

A run has 1 to 3 phases. Phase 2 starts at the first step whose timestep is <= ``switch_threshold``, phase 3
at the first step <= ``switch_threshold2`` (or, with a ``phase_config``, after ``steps_per_phase`` steps).
Phases 1..``model_switch_phase`` run on ``transformer`` (the high-noise expert), later phases on
``transformer_2``. Each phase has its guidance scale; each LoRA has one multiplier per phase ("1.0;0"), or
per step inside a phase ("0.9,0.7;0"), stretched over the phase's steps as the original does.

How it runs inside one diffusers pipeline call:

- experts: the pipeline's own ``boundary_ratio`` is set between the last high-noise step and the first
  low-noise step, so the pipeline switches exactly at the phase's step;
- LoRAs: a step-end callback calls ``set_adapters`` with the next step's multipliers (no reload);
- guidance: the pipeline is called with one guidance scale G (the largest asked for) and applies it as
  ``u + G·(c − u)``. Before a step whose phase asks for no guidance (g <= 1) the step callback turns the
  pipeline's classifier-free guidance off (``_guidance_scale = 1``, which its loop reads every step), so
  that step runs the conditional pass only, as the original does; it turns it back on for a guided
  phase. For a guided step with another g (and for the first step, which no callback precedes), a forward
  hook on the expert replaces the unconditional prediction u by ``u' = (u·(1 − g) + c·(g − G)) / (1 − G)``,
  which makes the pipeline's own formula give exactly ``u + g·(c − u)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from Wan2GP.catalog import ModelDefinition
    from Wan2GP.params import BaseParams

MAX_PHASES = 3


@dataclass(frozen=True)
class Multiplier:
    """A LoRA multiplier: one value for every phase, or one entry per phase; an entry is a number or a list
    of per-step numbers stretched over its phase's steps."""

    phases: tuple[float | tuple[float, ...], ...]

    @classmethod
    def constant(cls, value: float) -> Multiplier:
        return cls((float(value),))

    @classmethod
    def parse(cls, text: str) -> Multiplier:
        """ "1.0" / "1.0;0" / "0.9,0.7;0" -> Multiplier. ValueError names the bad value."""
        entries = text.strip().split(";")
        if len(entries) > MAX_PHASES:
            raise ValueError(f"multiplier {text!r} has {len(entries)} phases; at most {MAX_PHASES}")
        phases = []
        for entry in entries:
            values = []
            for item in entry.split(","):
                try:
                    number = float(item)
                except ValueError:
                    raise ValueError(f"multiplier {text!r}: {item!r} is not a number") from None
                if not -10.0 <= number <= 10.0:
                    raise ValueError(f"multiplier {text!r}: {number} is outside [-10, 10]")
                values.append(number)
            phases.append(values[0] if len(values) == 1 else tuple(values))
        return cls(tuple(phases))

    @property
    def is_constant(self) -> bool:
        return len(self.phases) == 1 and not isinstance(self.phases[0], tuple)

    def first(self) -> float:
        """The multiplier of the first step."""
        entry = self.phases[0]
        return entry[0] if isinstance(entry, tuple) else entry

    def describe(self) -> float | str:
        """A number when constant, else the original's string form ("1.0;0")."""
        return self.first() if self.is_constant else str(self)

    def __str__(self) -> str:
        return ";".join(",".join(map(str, p)) if isinstance(p, tuple) else str(p) for p in self.phases)

    def per_step(self, phase_of_step: list[int], num_phases: int, model_switch_phase: int) -> list[float]:
        """The multiplier of each step (``phase_of_step[i]`` is step i's phase, 0-based)."""
        total = len(phase_of_step)
        if len(self.phases) == 1:  # one entry shared by every phase: a list stretches over all steps
            return _stretch(self.phases[0], total)
        entries = list(self.phases)
        if len(entries) != num_phases:
            if len(entries) > num_phases:
                raise ValueError(f"multiplier '{self}' has {len(entries)} phases; this run has {num_phases}")
            # Two entries on a three-phase run: the original repeats the entry of the shared expert.
            entries = entries[:1] + entries if model_switch_phase == 2 else entries + entries[-1:]
        steps = []
        for phase, entry in enumerate(entries):
            steps += _stretch(entry, phase_of_step.count(phase))
        return steps


def _stretch(entry: float | tuple[float, ...], count: int) -> list[float]:
    """A value for each of ``count`` steps: a list is stretched over them (the original's expand_slist)."""
    values = entry if isinstance(entry, tuple) else (entry,)
    return [values[int(i * len(values) / count)] for i in range(count)]


@dataclass
class PhaseSpec:
    """The phases a task asks for, before its timesteps are known (:class:`PhasePlan` is the run's, by step)."""

    guidance: list[float]  # per phase
    thresholds: list[float | None] = field(default_factory=lambda: [None, None])  # timesteps of phase 2, 3
    steps_per_phase: list[int] | None = None  # a phase_config's steps (instead of thresholds)
    model_switch_phase: int = 1


def phase_spec(definition: ModelDefinition, params: BaseParams, guidance: float) -> PhaseSpec:
    """The task's phases: its phase_config, else its own phase keys over the model's defaults."""
    defaults = definition.defaults
    if params.phase_config is not None:
        config = params.phase_config
        return PhaseSpec(
            guidance=config.guidance(),
            steps_per_phase=list(config.steps_per_phase),
            model_switch_phase=config.model_switch_phase,
        )
    count = params.guidance_phases or defaults.guidance_phases
    guidance2 = next(g for g in (params.guidance2_scale, defaults.guidance2_scale, guidance) if g is not None)
    guidance3 = next(
        g for g in (params.guidance3_scale, defaults.guidance3_scale, guidance2) if g is not None
    )
    threshold = params.switch_threshold if params.switch_threshold is not None else defaults.switch_threshold
    threshold2 = (
        params.switch_threshold2 if params.switch_threshold2 is not None else defaults.switch_threshold2
    )
    return PhaseSpec(
        guidance=[guidance, guidance2, guidance3][:count],
        thresholds=[threshold, threshold2],
        model_switch_phase=params.model_switch_phase or defaults.model_switch_phase,
    )


@dataclass
class PhasePlan:
    """The phases of one run, step by step."""

    phase_of_step: list[int]  # 0-based phase of each denoising step
    guidance: list[float]  # guidance scale of each phase
    model_switch_phase: int  # phases after this one run on transformer_2 (when the model has it)
    two_experts: bool
    timesteps: list[float]
    lora_steps: dict[str, list[float]] = field(default_factory=dict)  # adapter name -> multiplier per step
    lora_files: dict[str, str] = field(default_factory=dict)  # adapter name -> LoRA file (for metadata)

    @property
    def num_phases(self) -> int:
        return len(self.guidance)

    @property
    def call_guidance(self) -> float:
        """The one guidance scale the pipeline is called with (CFG runs when it is > 1)."""
        return max(self.guidance) if max(self.guidance) > 1.0 else 1.0

    def expert_of_phase(self, phase: int) -> str:
        return "transformer_2" if self.two_experts and phase >= self.model_switch_phase else "transformer"

    def boundary_ratio(self) -> float | None:
        """The pipeline's expert switch, placed between the last high-noise and the first low-noise step."""
        if not self.two_experts:
            return None
        low = [i for i, p in enumerate(self.phase_of_step) if self.expert_of_phase(p) == "transformer_2"]
        if not low:
            return 0.0  # every timestep is >= 0: the high-noise expert throughout
        first = low[0]
        if first == 0:
            return (self.timesteps[0] + 1.0) / 1000.0  # above every timestep: the low-noise expert throughout
        return (self.timesteps[first - 1] + self.timesteps[first]) / 2.0 / 1000.0

    def describe(self) -> list[dict]:
        """The phases as run, for the artifact's metadata."""
        out = []
        for phase in range(self.num_phases):
            steps = [i for i, p in enumerate(self.phase_of_step) if p == phase]
            entry = {
                "phase": phase + 1,
                "steps": len(steps),
                "first_step": steps[0] + 1 if steps else None,
                "guidance_scale": self.guidance[phase],
                "expert": self.expert_of_phase(phase),
                "timesteps": [round(self.timesteps[i], 2) for i in steps],
            }
            if self.lora_steps:
                entry["lora_multipliers"] = {
                    self.lora_files.get(name, name): [values[i] for i in steps]
                    for name, values in self.lora_steps.items()
                }
            out.append(entry)
        return out


def scheduler_timesteps(scheduler, steps: int) -> list[float]:
    """The timesteps ``scheduler`` will run for ``steps`` steps (set on a copy: the original stays fresh)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps, device="cpu")
    return [float(t) for t in probe.timesteps]


def phases_from_thresholds(
    timesteps: list[float], num_phases: int, thresholds: list[float | None]
) -> list[int]:
    """Phase of each step: phase 2 from the first timestep <= thresholds[0], phase 3 from <= thresholds[1]
    (the original's get_model_switch_steps)."""
    switches = []
    for threshold in thresholds[: num_phases - 1]:
        step = next((i for i, t in enumerate(timesteps) if threshold is not None and t <= threshold), None)
        switches.append(len(timesteps) if step is None else step)
    return [sum(1 for s in switches if i >= s) for i in range(len(timesteps))]


def phases_from_steps(steps_per_phase: list[int]) -> list[int]:
    return [phase for phase, count in enumerate(steps_per_phase) for _ in range(count)]


class PhaseRunner:
    """Applies a :class:`PhasePlan` during one pipeline call: install it, call ``step_end`` from the step
    callback, and ``remove`` it afterwards."""

    def __init__(self, pipe, plan: PhasePlan):
        self.pipe = pipe
        self.plan = plan
        self.step = 0
        self._passes = 0  # forward passes of the current step: 1st = conditional, 2nd = unconditional
        self._cond: torch.Tensor | None = None
        self._hooks = []
        self._saved_boundary = None

    def install(self) -> None:
        pipe, plan = self.pipe, self.plan
        if plan.two_experts:
            self._saved_boundary = pipe.config.boundary_ratio
            pipe.register_to_config(boundary_ratio=plan.boundary_ratio())
        if plan.call_guidance > 1.0 and any(g != plan.call_guidance for g in plan.guidance):
            for name in ("transformer", "transformer_2"):
                module = getattr(pipe, name, None)
                if module is not None:
                    self._hooks.append(module.register_forward_hook(self._guidance_hook))
        self._set_loras(0)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._saved_boundary is not None:
            self.pipe.register_to_config(boundary_ratio=self._saved_boundary)

    def step_end(self, step: int) -> None:
        """Called after denoising step ``step`` (0-based): prepare step + 1."""
        self.step = step + 1
        self._passes = 0
        self._cond = None
        if self.step < len(self.plan.phase_of_step):
            self._set_loras(self.step)
            guided = self.plan.guidance[self.plan.phase_of_step[self.step]] > 1.0
            self.pipe._guidance_scale = self.plan.call_guidance if guided else 1.0

    def _set_loras(self, step: int) -> None:
        if not self.plan.lora_steps:
            return
        names = list(self.plan.lora_steps)
        weights = [self.plan.lora_steps[name][step] for name in names]
        if step == 0 or weights != [self.plan.lora_steps[name][step - 1] for name in names]:
            self.pipe.set_adapters(names, weights)

    def _guidance_hook(self, module, args, output):
        self._passes += 1
        prediction = output[0] if isinstance(output, tuple) else output.sample
        if self._passes == 1:
            self._cond = prediction
            return None
        wanted = self.plan.guidance[self.plan.phase_of_step[self.step]]
        applied = self.plan.call_guidance
        if wanted == applied:
            return None
        cond = self._cond.float()
        uncond = (prediction.float() * (1.0 - wanted) + cond * (wanted - applied)) / (1.0 - applied)
        uncond = uncond.to(prediction.dtype)
        return (uncond, *output[1:]) if isinstance(output, tuple) else type(output)(sample=uncond)
