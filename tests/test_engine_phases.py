"""Denoising phases (phase_config, Wan 2.2 experts, per-phase LoRA multipliers) on tiny Wan 2.2 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from Wan2GP.params import parse_params
from Wan2GP.phases import Multiplier, phases_from_thresholds
from Wan2GP.schedulers import make_scheduler
from Wan2GP.tiny import TINY_WAN22_LORAS
from Wan2GP.video import decode_video, encode_mp4, to_uint8_frames

pytest_plugins = ["engine_fixtures"]

HIGH, LOW = (name.removesuffix(".safetensors") for name in TINY_WAN22_LORAS)


def phase_config(phase1: dict, phase2: dict, steps=(2, 2), switch: int = 1) -> dict:
    return {
        "num_phases": 2,
        "steps_per_phase": list(steps),
        "flow_shift": 5,
        "sample_solver": "euler",
        "model_switch_phase": switch,
        "phases": [{"phase": 1, **phase1}, {"phase": 2, **phase2}],
    }


LIGHTNING = phase_config(
    {"guidance_scale": 3, "loras": [{"url": HIGH, "multiplier": "1.2"}]},
    {"guidance_scale": 1, "loras": [{"url": LOW, "multiplier": "1.0"}]},
)


# ---- parsing -----------------------------------------------------------------------------------------------


def test_multipliers_in_the_original_forms():
    params = parse_params("t2v", {"lora_names": ["a", "b"], "lora_multipliers": ["1.0;0", "0;1.0"]})
    assert [str(m) for _, m in params.lora_requests()] == ["1.0;0.0", "0.0;1.0"]
    assert (
        parse_params("t2v", {"lora_names": "a, b", "loras_multipliers": "1.0;0 0.5"})
        .loras_multipliers[1]
        .is_constant
    )
    assert parse_params("t2v", {"lora_names": "a", "loras_multipliers": 0.7}).loras_multipliers == [
        Multiplier.constant(0.7)
    ]  # a bare number (was a TypeError -> 500)
    # a comma list is per step, stretched over its phase like the original's expand_slist
    assert Multiplier.parse("1,0.5;0").per_step([0, 0, 0, 0, 1, 1], 2, 1) == [1, 1, 0.5, 0.5, 0, 0]
    # two entries on a three-phase run repeat the entry of the expert that runs two phases
    assert Multiplier.parse("1;0").per_step([0, 1, 2], 3, 2) == [1, 1, 0]
    assert Multiplier.parse("1;0").per_step([0, 1, 2], 3, 1) == [1, 0, 0]
    for bad in ("1;0;0;0", "high", "1;x"):
        with pytest.raises(ValidationError, match="loras_multipliers"):
            parse_params("t2v", {"lora_names": "a", "loras_multipliers": [bad]})


def test_phase_config_replaces_the_task_loras_and_reports_it():
    params = parse_params("t2v", {"lora_names": ["x"], "lora_multipliers": ["1"], "phase_config": LIGHTNING})
    assert [(name, str(m)) for name, m in params.lora_requests()] == [(HIGH, "1.2;0.0"), (LOW, "0.0;1.0")]
    assert params.ignored_params()["activated_loras"] == "replaced by phase_config, as in the original"
    with pytest.raises(ValidationError, match="steps_per_phase has 3 values for 2 phases"):
        parse_params("t2v", {"phase_config": {**LIGHTNING, "steps_per_phase": [1, 1, 1]}})
    with pytest.raises(ValidationError, match="sample_solver"):
        parse_params("t2v", {"phase_config": {**LIGHTNING, "sample_solver": "ddim"}})
    defaults = parse_params(
        "t2v", {"phase_config": {"steps_per_phase": [1, 1], "sample_solver": "", "phases": [{}, {}]}}
    )
    assert defaults.phase_config.sample_solver == "unipc"  # "" schedules as unipc in the original
    assert (defaults.phase_config.guidance(), defaults.phase_config.model_switch_phase) == ([3.0, 1.0], 2)


def test_phase_switch_steps_follow_the_original_thresholds():
    timesteps = [1000.0, 937.0, 833.0, 625.0, 500.0, 300.0]
    assert phases_from_thresholds(timesteps, 2, [875, None]) == [0, 0, 1, 1, 1, 1]
    assert phases_from_thresholds(timesteps, 3, [900, 558]) == [0, 0, 1, 1, 2, 2]
    assert phases_from_thresholds(timesteps, 2, [100, None]) == [0] * 6  # never reached: one phase


# ---- runs on tiny Wan 2.2 ------------------------------------------------------------------------------------


def _frames(artifact) -> np.ndarray:
    return decode_video(artifact.data)[0].astype(np.int16)


def test_two_phase_run_switches_expert_guidance_and_loras_at_the_boundary(engine):
    params = {"model": "tiny-t2v-22", "prompt": "a cat walking", "seed": 3, "phase_config": LIGHTNING}
    run = engine.generate("t2v_22", params)
    phases = run.metadata["phases"]
    assert [(p["steps"], p["guidance_scale"], p["expert"]) for p in phases] == [
        (2, 3, "transformer"),
        (2, 1, "transformer_2"),
    ]
    assert phases[0]["lora_multipliers"] == {TINY_WAN22_LORAS[0]: [1.2, 1.2], TINY_WAN22_LORAS[1]: [0, 0]}
    assert phases[1]["lora_multipliers"] == {TINY_WAN22_LORAS[0]: [0, 0], TINY_WAN22_LORAS[1]: [1.0, 1.0]}
    assert (run.metadata["steps"], run.metadata["sample_solver"], run.metadata["flow_shift"]) == (
        4,
        "euler",
        5,
    )

    # the run equals a denoising loop written out by hand from the same steps (LoRAs still loaded)
    assert run.data == _reference_run(engine, "a cat walking", seed=3)

    # unguided steps run the conditional pass only, as in the original: 2 x 2 passes, then 2 x 1
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [
        getattr(engine.pipe, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in calls
    ]
    try:
        assert engine.generate("t2v_22", params).data == run.data
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"transformer": 4, "transformer_2": 2}

    # each phase's settings held for the whole run (both phases alike) give other videos
    first = phase_config(*[LIGHTNING["phases"][0]] * 2, switch=2)
    second = phase_config(*[LIGHTNING["phases"][1]] * 2, switch=0 + 1)
    second["steps_per_phase"] = [1, 3]  # ... on the low-noise expert from step 2 on
    for other in (first, second):
        other_run = engine.generate("t2v_22", {**params, "phase_config": other})
        assert np.abs(_frames(other_run) - _frames(run)).mean() > 0.5


def _reference_run(engine, prompt: str, seed: int) -> bytes:
    """Phase 1 (2 steps): high-noise expert, CFG 3, high LoRA 1.2; phase 2 (2 steps): low-noise expert,
    no CFG, low LoRA 1.0; Euler on the original's shifted schedule (shift 5)."""
    pipe = engine.pipe
    adapters = {name.split("_")[2]: name for name in pipe.transformer._hwgp_loras}  # "high" / "low"
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(
            prompt=prompt, negative_prompt="", do_classifier_free_guidance=True, max_sequence_length=32,
            device=torch.device("cpu"),
        )  # fmt: skip
        latents = pipe.prepare_latents(
            1, 16, 32, 32, 9, torch.float32, torch.device("cpu"), torch.Generator("cpu").manual_seed(seed)
        )
        scheduler = make_scheduler(engine._base_scheduler, "euler", 5.0)
        scheduler.set_timesteps(4)
        for i, t in enumerate(scheduler.timesteps):
            high_phase = i < 2
            pipe.set_adapters([adapters["high"], adapters["low"]], [1.2, 0.0] if high_phase else [0.0, 1.0])
            model = pipe.transformer if high_phase else pipe.transformer_2
            step = {"hidden_states": latents, "timestep": t.expand(1), "return_dict": False}
            noise = model(encoder_hidden_states=cond, **step)[0]
            if high_phase:
                noise_uncond = model(encoder_hidden_states=uncond, **step)[0]
                noise = noise_uncond + 3 * (noise - noise_uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        video = pipe.vae.decode(latents * std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return encode_mp4(to_uint8_frames(frames), fps=8)


def test_two_experts_switch_at_the_models_threshold_and_task_keys_override(engine):
    params = {"model": "tiny-t2v-22", "prompt": "a dog", "seed": 2}
    default = engine.generate("t2v_22", params)
    assert [(p["steps"], p["expert"], p["guidance_scale"]) for p in default.metadata["phases"]] == [
        (2, "transformer", 5.0),
        (2, "transformer_2", 3.0),
    ]  # the tiny model's switch_threshold 875 and guidance2_scale 3
    high_only = engine.generate("t2v_22", {**params, "switch_threshold": 0})
    assert [p["expert"] for p in high_only.metadata["phases"] if p["steps"]] == ["transformer"]
    assert np.abs(_frames(high_only) - _frames(default)).mean() > 0.5
    guided = engine.generate("t2v_22", {**params, "guidance2_scale": 7.0})
    assert guided.metadata["phases"][1]["guidance_scale"] == 7.0
    assert np.abs(_frames(guided) - _frames(default)).mean() > 0.1


def test_three_phases_on_vace_22_keep_the_high_expert_for_two_phases(engine):
    guide = np.full((9, 32, 32, 3), 127, np.uint8)
    config = {
        "num_phases": 3,
        "steps_per_phase": [1, 1, 2],
        "flow_shift": 5,
        "sample_solver": "euler",
        "model_switch_phase": 2,
        "phases": [
            {"guidance_scale": 3, "loras": [{"url": HIGH, "multiplier": "1.0"}]},
            {"guidance_scale": 1, "loras": [{"url": HIGH, "multiplier": "0.5"}]},
            {"guidance_scale": 1, "loras": [{"url": LOW, "multiplier": "1.0"}]},
        ],
    }
    run = engine.generate(
        "vace_22", {"model": "tiny-vace-22", "seed": 1, "video_guide": guide, "phase_config": config}
    )
    assert [(p["steps"], p["expert"], p["guidance_scale"]) for p in run.metadata["phases"]] == [
        (1, "transformer", 3),
        (1, "transformer", 1),
        (2, "transformer_2", 1),
    ]
    assert run.metadata["phases"][1]["lora_multipliers"][TINY_WAN22_LORAS[0]] == [0.5]


def test_every_tiny_wan22_model_runs_with_the_real_classes(engine):
    image = np.zeros((32, 32, 3), np.uint8)
    i2v = engine.generate("i2v_22", {"model": "tiny-i2v-22", "seed": 1, "image_start": image})
    assert i2v.metadata["model"] == "tiny-i2v-22" and i2v.metadata["phases"][1]["expert"] == "transformer_2"
    ti2v = engine.generate("t2v", {"model": "tiny-ti2v-22", "seed": 1})
    assert (ti2v.metadata["width"], ti2v.metadata["height"], ti2v.metadata["frames"]) == (64, 32, 9)
    assert type(engine.pipe.vae).__name__ == "AutoencoderKLWan" and engine.pipe.vae.config.z_dim == 48
    assert engine.pipe.config.expand_timesteps


def test_lightning_baseline_defaults_give_the_original_2_2_2_steps(engine):
    guide = np.full((9, 32, 32, 3), 127, np.uint8)
    run = engine.generate("vace_22", {"model": "tiny-vace-22-lightning", "seed": 1, "video_guide": guide})
    phases = run.metadata["phases"]
    # Euler, shift 5, 6 steps: timesteps 1000, 952, 883, 770, 557, 5; switches at <= 883 and <= 558
    assert [(p["steps"], p["expert"], p["guidance_scale"]) for p in phases] == [
        (2, "transformer", 3.0),
        (2, "transformer", 1.0),
        (2, "transformer_2", 1.0),
    ]
    assert [round(t) for p in phases for t in p["timesteps"]] == [1000, 952, 883, 770, 557, 5]


def test_wan22_task_types_route_to_wan22_and_its_i2v_takes_a_last_frame(engine, catalog):
    from Wan2GP.catalog import resolve_model

    def model_of(task_type: str, default_models: dict, **params) -> str:
        return resolve_model(catalog, default_models, task_type, parse_params(task_type, params)).id

    # the catalog's task-type defaults (the original's): *_22 never quietly runs Wan 2.1
    assert model_of("t2v_22", {}) == "wan2.2-t2v-a14b"
    assert model_of("t2v_22", {"t2v": "tiny-t2v"}) == "wan2.2-t2v-a14b"
    assert model_of("i2v_22", {}, image_start=np.zeros((8, 8, 3), np.uint8)) == "wan2.2-i2v-a14b"
    assert model_of("vace_22", {}, video_guide=np.zeros((5, 8, 8, 3), np.uint8)) == "vace_14B_cocktail_2_2"
    assert model_of("t2v", {}) == "wan2.1-t2v-1.3b"
    # a Wan 2.2 I2V model takes image_end itself; a Wan 2.1 i2v task with image_end goes to a flf2v model
    ends = {"image_start": np.zeros((8, 8, 3), np.uint8), "image_end": np.zeros((8, 8, 3), np.uint8)}
    assert model_of("i2v_22", {"i2v_22": "tiny-i2v-22"}, **ends) == "tiny-i2v-22"
    assert model_of("i2v", {"i2v": "tiny-i2v", "flf2v": "tiny-flf2v"}, **ends) == "tiny-flf2v"

    start = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    end = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    base = {"seed": 1, "image_start": start, "num_inference_steps": 2}
    with_end = engine.generate("i2v_22", {**base, "image_end": end})
    assert with_end.metadata["model"] == "tiny-i2v-22"
    assert np.abs(_frames(with_end) - _frames(engine.generate("i2v_22", base))).mean() > 0.5
