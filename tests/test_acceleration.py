"""Wan2GP.acceleration on CPU with the tiny models: compiled blocks, MagCache step caching, the original's params."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from torch.profiler import profile

from Wan2GP.acceleration import (
    AccelerationConfig,
    _full_forwards,
    attention_tokens,
    calibrate_mag_ratios,
    choose_attention_backend,
    load_mag_ratios,
    mag_threshold,
    needs_vae_tiling,
    parse_step_cache,
    vae_decode_bytes,
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

    # Step caching on a compiled engine: the blocks' own forwards run compiled under the cache hooks, skipping
    # what the eager engine skips and computing what it computes; afterwards the blocks are as they were.
    cached_params = {**PARAMS, "num_inference_steps": STEPS, "skip_steps_cache_type": "mag"}
    calibrate_mag_ratios(compiled_engine, "t2v", {**PARAMS, "num_inference_steps": STEPS})
    with profile() as profiler:
        cached_compiled, metadata = _latents(compiled_engine, cached_params)
    report = metadata["acceleration"]["step_cache"]
    compiled_calls = sum(event.name.startswith("Torch-Compiled Region") for event in profiler.events())
    assert compiled_calls == report["computed"] * len(blocks)  # each block that ran, ran compiled
    assert report["notes"] == ["blocks ran compiled, the cache hooks eager around them"]
    assert all(callable(getattr(block, "_hwgp_compiled_forward", None)) for block in blocks)
    assert all(block._compiled_call_impl is not None and "forward" not in vars(block) for block in blocks)
    cached_eager, eager_metadata = _latents(
        Engine(device="cpu", catalog=catalog, lora_dirs=[]), cached_params
    )
    assert eager_metadata["acceleration"]["step_cache"]["computed"] == report["computed"] < report["forwards"]
    error = float(np.linalg.norm(cached_compiled - cached_eager) / np.linalg.norm(cached_eager))
    print(f"MagCache compiled vs eager final latents: relative error {error:.2e}")
    assert error < 1e-4


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


def test_vae_tiling_only_when_the_decode_would_not_fit():
    gib = 2**30
    # 832x480x81 in float32 needs ~10 GiB (measured 9.6 GiB on an H200); bf16 about half.
    assert vae_decode_bytes(832, 480, 81, torch.float32) == pytest.approx(10.0 * gib, rel=0.05)
    assert needs_vae_tiling(832, 480, 81, torch.float32, free_bytes=8 * gib)
    assert not needs_vae_tiling(832, 480, 81, torch.float32, free_bytes=20 * gib)
    assert not needs_vae_tiling(832, 480, 81, torch.bfloat16, free_bytes=8 * gib)
    assert needs_vae_tiling(1280, 720, 81, torch.float32, free_bytes=20 * gib)
    assert not needs_vae_tiling(1280, 720, 81, torch.float32, free_bytes=None)  # CPU: no device limit
    with pytest.raises(ValueError, match="vae_tiling: must be true, false or 'auto'"):
        AccelerationConfig(vae_tiling="sometimes").check("resident", "cpu")


@pytest.mark.parametrize("setting", [True, False, "auto"])
def test_vae_tiling_is_applied_for_the_task_and_recorded(catalog: Catalog, setting):
    engine = Engine(
        device="cpu", catalog=catalog, lora_dirs=[], acceleration=AccelerationConfig(vae_tiling=setting)
    )
    seen = []
    engine.load("tiny-t2v")
    original = engine.pipe.vae.decode

    def decode(*args, **kwargs):
        seen.append(engine.pipe.vae.use_tiling)  # what the decode ran with
        return original(*args, **kwargs)

    engine.pipe.vae.decode = decode
    artifact = engine.generate("t2v", {**PARAMS, "num_inference_steps": 1})
    expected = setting is True  # auto on a CPU: never
    assert seen == [expected]
    assert artifact.metadata["acceleration"]["vae_tiling"] is expected
    assert engine.pipe.vae.use_tiling is False  # restored after the task


def test_channels_last_vae_decodes_what_the_default_layout_does(catalog: Catalog):
    params = {**PARAMS, "num_inference_steps": 2}
    default = Engine(device="cpu", catalog=catalog, lora_dirs=[])
    assert default.acceleration.vae_channels_last is False  # auto: CUDA only
    channels_last = Engine(
        device="cpu", catalog=catalog, lora_dirs=[], acceleration=AccelerationConfig(vae_channels_last=True)
    )
    reference = default.render("t2v", params)
    artifact = channels_last.render("t2v", params)
    assert artifact.metadata["acceleration"]["vae_channels_last"] is True
    convolutions = [m for m in channels_last.pipe.vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convolutions and all(
        m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convolutions
    )
    a, b = artifact.frames.astype(np.float64), reference.frames.astype(np.float64)
    assert np.abs(a - b).max() <= 1  # uint8 frames: at most one level of rounding apart


def test_attention_tokens_follow_the_model_and_size():
    assert attention_tokens("t2v", 832, 480, 81) == 21 * 30 * 52  # the 32760 tokens of a Wan 480p video
    assert attention_tokens("vace", 1280, 720, 81) == 21 * 45 * 80
    assert attention_tokens("flux", 1024, 1024, 1) == 64 * 64 + 512


def test_attention_auto_times_the_installed_backends_and_keeps_the_fastest_exact_one(catalog: Catalog):
    engine = Engine(
        device="cpu", catalog=catalog, lora_dirs=[], acceleration=AccelerationConfig(attention_backend="auto")
    )
    _, metadata = _latents(engine, {**PARAMS, "num_inference_steps": 1})
    choice = metadata["acceleration"]["attention_choice"]
    print(f"attention auto on CPU: {choice}")
    assert set(choice["timings_ms"]) == {"native", "_native_math"}  # the CPU candidates, both exact
    assert all(ms > 0 for ms in choice["timings_ms"].values())
    assert choice["backend"] == min(choice["timings_ms"], key=choice["timings_ms"].get)
    assert metadata["acceleration"]["attention_backend"] == choice["backend"]
    processor = engine.pipe.transformer.blocks[0].attn1.processor
    assert getattr(processor, "_attention_backend", None) in (choice["backend"], None)


def test_attention_auto_refuses_a_backend_that_is_not_exact(catalog: Catalog):
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[])
    engine.load("tiny-t2v")
    transformer = engine.pipe.transformer
    choice = choose_attention_backend(transformer, tokens=64)
    assert choice["backend"] in choice["timings_ms"] and choice["tokens"] == 64
    strict = choose_attention_backend(transformer, tokens=64, exact_error=-1.0)  # nothing counts as exact
    assert strict["timings_ms"] == {}  # even native vs itself: error 0 > -1
    assert "not exact" in strict["unavailable"]["_native_math"]
    assert strict["backend"] == "native"  # the fallback: diffusers' default


def test_a_compiled_engine_stops_compiling_once_sizes_have_varied(catalog: Catalog, cache_dir: Path):
    """Dynamo compiles the blocks for the first size, again (dynamic width) and again (dynamic height) as
    sizes vary; from then on a new resolution or length reuses the dynamic-shape code: no compile per size."""
    engine = Engine(
        device="cpu",
        catalog=catalog,
        lora_dirs=[],
        acceleration=AccelerationConfig(compile=True, inductor_cache_dir=str(cache_dir / "inductor")),
    )
    params = {**PARAMS, "num_inference_steps": 1}
    graphs = []
    for resolution in ("64x48", "80x48", "96x64"):
        engine.generate("t2v", {**params, "resolution": resolution})
        graphs.append(counters["stats"]["unique_graphs"])
    settled = graphs[-1]
    for resolution, frames in (("112x64", 9), ("128x80", 13), ("64x48", 9), ("144x96", 5)):
        engine.generate("t2v", {**params, "resolution": resolution, "video_length": frames})
    print(
        f"unique graphs after the first three sizes: {graphs}; after four more: {counters['stats']['unique_graphs']}"
    )
    assert counters["stats"]["unique_graphs"] == settled
