"""Wan2GP.acceleration on CPU with the tiny models: compiled blocks, MagCache step caching, the original's params."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from Wan2GP.acceleration import (
    AccelerationConfig,
    _full_forwards,
    calibrate_mag_ratios,
    load_mag_ratios,
    mag_threshold,
    parse_step_cache,
)
from Wan2GP.catalog import Catalog
from Wan2GP.engine import Engine
from Wan2GP.parallel import wrap_vae_decode

pytest_plugins = ["engine_fixtures"]

PARAMS = {"model": "tiny-t2v", "prompt": "a cat", "resolution": "64x48", "video_length": 9, "seed": 1}
STEPS = 10


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HWGP_CACHE_DIR", str(tmp_path / "hwgp-cache"))
    return tmp_path / "hwgp-cache"


def _latents(engine: Engine, params: dict) -> tuple[np.ndarray, dict]:
    engine.load(params["model"])
    recorder = wrap_vae_decode(engine.pipe.vae)
    artifact = engine.generate("t2v", params)
    return recorder.last_latents.numpy(), artifact.metadata


def test_compiled_blocks_compute_what_eager_does_and_reuse_the_disk_cache(catalog: Catalog, cache_dir: Path):
    params = {**PARAMS, "num_inference_steps": 3}
    eager, _ = _latents(Engine(device="cpu", catalog=catalog, lora_dirs=[]), params)
    inductor = cache_dir / "inductor"
    compiled_engine = Engine(
        device="cpu",
        catalog=catalog,
        lora_dirs=[],
        acceleration=AccelerationConfig(compile=True, inductor_cache_dir=str(inductor)),
    )
    compiled, metadata = _latents(compiled_engine, params)
    assert metadata["acceleration"]["compiled"] == ["transformer"]
    assert metadata["acceleration"]["attention_backend"] == "native"
    blocks = compiled_engine.pipe.transformer.blocks
    assert all(block._compiled_call_impl is not None for block in blocks)  # regional: each block compiled
    error = float(np.linalg.norm(compiled - eager) / np.linalg.norm(eager))
    print(f"compiled vs eager final latents: relative error {error:.2e}")
    assert error < 1e-4
    assert any(inductor.rglob("*"))  # artefacts on disk, for the next process

    # Step caching on a compiled engine runs the blocks eager for that task, then compiled again.
    calibrate_mag_ratios(compiled_engine, "t2v", {**PARAMS, "num_inference_steps": STEPS})
    cached = compiled_engine.generate(
        "t2v", {**PARAMS, "num_inference_steps": STEPS, "skip_steps_cache_type": "mag"}
    )
    assert "ran eager" in cached.metadata["acceleration"]["step_cache"]["notes"][0]
    assert all(block._compiled_call_impl is not None for block in blocks)


def test_compile_needs_the_resident_profile_and_a_known_backend(catalog: Catalog):
    with pytest.raises(ValueError, match="compile: needs memory_profile 'resident'"):
        Engine(device="cpu", memory_profile="model_offload", acceleration=AccelerationConfig(compile=True))
    with pytest.raises(ValueError, match="attention_backend: 'fastest' is not one of"):
        Engine(device="cpu", acceleration=AccelerationConfig(attention_backend="fastest"))
    engine = Engine(
        device="cpu",
        catalog=catalog,
        lora_dirs=[],
        acceleration=AccelerationConfig(attention_backend="_native_math"),
    )
    _, metadata = _latents(engine, {**PARAMS, "num_inference_steps": 1})
    assert metadata["acceleration"]["attention_backend"] == "_native_math"


def test_mag_cache_skips_the_asked_share_of_forwards(catalog: Catalog, cache_dir: Path):
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[])
    params = {**PARAMS, "num_inference_steps": STEPS}
    with pytest.raises(ValueError, match="calibrate them once"):
        engine.generate("t2v", {**params, "skip_steps_cache_type": "mag"})

    ratios = calibrate_mag_ratios(engine, "t2v", params)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert load_mag_ratios("tiny-t2v") == ratios  # saved under $HWGP_CACHE_DIR for the next process
    exact, metadata = _latents(engine, params)
    assert metadata["acceleration"]["step_cache"] is None

    for multiplier in (1.5, 2.0):
        request = {"skip_steps_cache_type": "mag", "skip_steps_multiplier": multiplier,
                   "skip_steps_start_step_perc": 20}  # fmt: skip
        cached, metadata = _latents(engine, {**params, **request})
        report = metadata["acceleration"]["step_cache"]
        print(f"mag x{multiplier}: {report}")
        assert report["forwards"] == 2 * STEPS  # CFG: cond + uncond per step
        # The transformer's blocks ran on at most 1/multiplier of the forwards, and the first 20% always ran.
        assert report["computed"] <= report["forwards"] / multiplier
        assert report["computed"] >= 2 * 2
        assert report["skipped_fraction"] == pytest.approx(1 - report["computed"] / report["forwards"])
        error = float(np.linalg.norm(cached - exact) / np.linalg.norm(exact))
        print(f"mag x{multiplier}: final latents relative error vs exact {error:.2e}")
        assert 0 < error < 0.5  # skipping changes the result, within reason
    # The hooks are gone after the task: the next exact task matches the first one.
    again, _ = _latents(engine, params)
    assert np.array_equal(again, exact)


def test_the_original_step_cache_params_are_checked_by_name():
    assert parse_step_cache({}) is None
    assert parse_step_cache({"skip_steps_cache_type": ""}) is None
    request = parse_step_cache({"skip_steps_cache_type": "mag"})
    assert (request.multiplier, request.start_step_perc) == (1.5, 20.0)
    with pytest.raises(ValueError, match="skip_steps_cache_type: 'tea' \\(TeaCache\\)"):
        parse_step_cache({"skip_steps_cache_type": "tea"})
    with pytest.raises(ValueError, match="skip_steps_cache_type: 'fast'"):
        parse_step_cache({"skip_steps_cache_type": "fast"})
    with pytest.raises(ValueError, match="skip_steps_multiplier"):
        parse_step_cache({"skip_steps_cache_type": "mag", "skip_steps_multiplier": 0.5})
    with pytest.raises(ValueError, match="skip_steps_start_step_perc"):
        parse_step_cache({"skip_steps_cache_type": "mag", "skip_steps_start_step_perc": 120})


def test_mag_threshold_meets_the_multiplier_on_given_ratios():
    ratios = [1.0] + [1.0 + 0.01 * ((-1) ** i) * (1 + i / 10) for i in range(1, 50)]
    for multiplier in (1.5, 2.0, 2.5):
        threshold = mag_threshold(ratios, 50, multiplier, 20, 3)
        full = _full_forwards(ratios, 50, threshold, 10, 3)
        assert full <= 50 / multiplier
        assert _full_forwards(ratios, 50, threshold * 0.9, 10, 3) >= full  # a lower threshold skips less
    # Out of reach (at most 3 skips after each full step): the most it can skip.
    assert _full_forwards(ratios, 50, mag_threshold(ratios, 50, 8.0, 20, 3), 10, 3) == 10 + 10
