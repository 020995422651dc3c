"""One generation split across processes (Wan2GP.parallel), on CPU: gloo, 2 processes, tiny models.

Each multi-process check spawns real processes that join a real gloo process group; the single-process
reference runs in this process on the same tiny model, seed and params.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hwgp_testing import free_port, start_local_ray
from Wan2GP.catalog import Catalog
from Wan2GP.engine import Engine
from Wan2GP.parallel_plan import MODES, NCCL_SAFE_ENV, plan_degrees
from Wan2GP.video import decode_video, to_uint8_frames

pytest_plugins = ["engine_fixtures"]

PARAMS = {"prompt": "a cat walking", "resolution": "64x48", "video_length": 9, "seed": 11}
STEPS = 3


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def vace_params() -> dict:
    guide = np.random.default_rng(4).integers(0, 256, (9, 48, 64, 3), dtype=np.uint8)
    mask = np.zeros((9, 48, 64), np.uint8)
    mask[3:] = 255  # keep the first 3 frames, generate the rest
    return {
        **PARAMS,
        "model": "tiny-vace",
        "num_inference_steps": STEPS,
        "video_guide": guide,
        "video_mask": mask,
    }


def reference_run(catalog: Catalog, params: dict) -> dict:
    """Final latents, float frames and encoded bytes of single-process runs (the results to match)."""
    from Wan2GP.parallel import wrap_vae_decode
    from Wan2GP.params import parse_params
    from Wan2GP.pipelines import run_t2v

    engine = Engine(device="cpu", catalog=catalog, default_models={"t2v": "tiny-t2v"}, lora_dirs=[])
    engine.load("tiny-t2v")
    recorder = wrap_vae_decode(engine.pipe.vae)  # records the latents only: this engine is not parallel
    artifact = engine.generate("t2v", params)
    latents = recorder.last_latents.numpy()
    parsed = parse_params("t2v", params)
    definition = engine.resolve_model("t2v", parsed)
    settings = engine._settings(definition, "t2v", parsed)
    engine.pipe.scheduler = engine._scheduler(settings)
    frames = run_t2v(engine.pipe, parsed, settings, {})
    engine.load("tiny-vace")
    vace_recorder = wrap_vae_decode(engine.pipe.vae)
    vace = engine.generate("vace", vace_params())
    return {
        "latents": latents,
        "frames": frames,
        "bytes": artifact.data,
        "vace_latents": vace_recorder.last_latents.numpy(),
        "vace_frames": decode_video(vace.data)[0],
    }


# ---- what runs in each spawned rank ------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, port: int, mode: str, tiny_root: str, out: str) -> None:
    """One rank: the sharded attention check, a whole generation, float frames and a collective cancel."""
    torch.set_num_threads(1)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from Wan2GP.errors import Cancelled
    from Wan2GP.parallel import (
        _PARALLEL_ENGINES,
        build_layout,
        context_parallel_config,
        init_distributed,
        run_parallel_generation,
    )
    from Wan2GP.params import parse_params
    from Wan2GP.pipelines import run_t2v

    device = init_distributed(rank, world_size, "127.0.0.1", port, device="cpu")
    result: dict = {"rank": rank}

    if plan_degrees(mode, world_size)[1] > 1:
        layout = build_layout(mode, device)
        # Sharded attention alone: each rank holds a slice of the sequence, attends over all of it.
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 24, 4, 8) for _ in range(3))
        full = torch.nn.functional.scaled_dot_product_attention(
            *(x.permute(0, 2, 1, 3) for x in (q, k, v))
        ).permute(0, 2, 1, 3)
        local = layout.cp_mesh["ulysses"].get_local_rank()
        piece = 24 // layout.ulysses_degree
        shard = slice(local * piece, (local + 1) * piece)
        sharded = dispatch_attention_fn(
            q[:, shard].contiguous(),
            k[:, shard].contiguous(),
            v[:, shard].contiguous(),
            parallel_config=context_parallel_config(layout),
        )
        result["attention_max_abs_error"] = float((sharded - full[:, shard]).abs().max())

    catalog = Catalog.load(tiny_dir=tiny_root)
    engine = Engine(device="cpu", catalog=catalog, default_models={"t2v": "tiny-t2v"}, lora_dirs=[])
    engine.load("tiny-t2v")
    # How many video tokens self-attention sees on this rank: the whole sequence, or this rank's shard.
    block_tokens: list[int] = []
    engine.pipe.transformer.blocks[0].attn1.register_forward_pre_hook(
        lambda module, args: block_tokens.append(args[0].shape[1])
    )
    # The text encoder runs on rank 0 only; the others receive its embeddings.
    text_encoder_calls: list[int] = []
    engine.pipe.text_encoder.register_forward_pre_hook(lambda module, args: text_encoder_calls.append(1))
    params = {**PARAMS, "num_inference_steps": STEPS}
    artifact = run_parallel_generation(engine, "t2v", params, mode, task_id=f"rank{rank}")
    result["block_tokens"] = sorted(set(block_tokens))
    result["text_encoder_calls"] = len(text_encoder_calls)
    result["split_decode_used"] = engine.pipe.vae._hwgp_decode_recorder.split_used
    result["timings"] = artifact.metadata["timings"]
    Path(out, f"rank{rank}.mp4").write_bytes(artifact.data)
    np.save(Path(out, f"rank{rank}-latents.npy"), _PARALLEL_ENGINES[engine].last_latents.numpy())

    parsed = parse_params("t2v", params)
    settings = engine._settings(engine.resolve_model("t2v", parsed), "t2v", parsed)
    engine.pipe.scheduler = engine._scheduler(settings)
    np.save(Path(out, f"rank{rank}.npy"), run_t2v(engine.pipe, parsed, settings, {}))

    # Only the last rank asks to cancel, after step 2; every rank must stop there together.
    steps_seen: list[int] = []
    try:
        run_parallel_generation(
            engine,
            "t2v",
            {**params, "num_inference_steps": 4},
            mode,
            progress=lambda step, total: steps_seen.append(step),
            should_cancel=lambda: rank == world_size - 1 and len(steps_seen) >= 2,
        )
        result["cancelled"] = False
    except Cancelled:
        result["cancelled"] = True
    result["steps_before_cancel"] = len(steps_seen)
    # A random seed is drawn once and shared: every rank denoises the same noise.
    drawn = run_parallel_generation(engine, "t2v", {**params, "seed": -1, "num_inference_steps": 1}, mode)
    result["random_seed"] = drawn.metadata["seed"]
    result["random_digest"] = hashlib.sha256(drawn.data).hexdigest()
    if mode == "cfg":
        # VACE (what chained travel runs) under the CFG split, conditioning encode, decode and encode split too.
        engine.load("tiny-vace")
        encoded_frames: list[int] = []  # frames through the VAE encoder on this rank
        engine.pipe.vae.encoder.register_forward_pre_hook(
            lambda module, args: encoded_frames.append(args[0].shape[2])
        )
        vace = run_parallel_generation(engine, "vace", vace_params(), mode)
        result["vace_encoded_frames"] = sum(encoded_frames)
        Path(out, f"rank{rank}-vace.mp4").write_bytes(vace.data)
        np.save(Path(out, f"rank{rank}-vace-latents.npy"), _PARALLEL_ENGINES[engine].last_latents.numpy())
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _spawn(mode: str, world_size: int, tiny_dir: Path, out: Path) -> list[dict]:
    port = free_port()
    mp.spawn(
        _rank_main,
        args=(world_size, port, mode, str(tiny_dir.parent), str(out)),
        nprocs=world_size,
        join=True,
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


# ---- the tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(catalog: Catalog) -> dict:
    return reference_run(catalog, {**PARAMS, "num_inference_steps": STEPS})


# 64x48, 9 frames -> 3 latent frames of 6x8 latents -> 3 x 3 x 4 = 36 tokens after the 2x2 patches.
TOKENS = 36


@pytest.mark.parametrize(("mode", "world_size"), [("cfg", 2), ("ulysses", 2), ("cfg+ulysses", 4)])
def test_parallel_generation_matches_single_process(
    mode: str, world_size: int, tiny_dir: Path, reference, tmp_path: Path
) -> None:
    results = _spawn(mode, world_size, tiny_dir, tmp_path)
    ref_decoded, _ = decode_video(reference["bytes"])

    for rank, result in enumerate(results):
        latents = np.load(tmp_path / f"rank{rank}-latents.npy")
        latent_error = relative_error(latents, reference["latents"])
        latent_max_abs = float(np.abs(latents - reference["latents"]).max())
        frames = np.load(tmp_path / f"rank{rank}.npy")
        error = relative_error(frames, reference["frames"])
        decoded, _ = decode_video((tmp_path / f"rank{rank}.mp4").read_bytes())
        file_error = relative_error(decoded, ref_decoded)
        print(
            f"{mode} rank {rank} vs single process: latents rel {latent_error:.2e} max-abs {latent_max_abs:.2e}; "
            f"frames (split decode) rel {error:.2e}; decoded MP4 (split encode) rel {file_error:.2e}"
        )
        ulysses = plan_degrees(mode, world_size)[1]
        assert result["block_tokens"] == [TOKENS // ulysses]
        assert (result["text_encoder_calls"] > 0) == (rank == 0)  # prompt and negative prompt: rank 0 only
        # 3 latent frames: split over 2 ranks; too short for 4 (each rank needs a frame past frame 0).
        assert result["split_decode_used"] is (world_size == 2)
        # The split decode's parts, this rank's, in the result beside the decode stage that holds them.
        parts = ("decode_chunks", "decode_handoff", "decode_gather")
        if world_size == 2:
            assert all(result["timings"][part] >= 0 for part in parts), result["timings"]
            assert sum(result["timings"][part] for part in parts) <= result["timings"]["decode"]
        else:
            assert not set(parts) & set(result["timings"])
        if mode == "cfg":
            # Same arithmetic as one process, only split. Bit-identical on most CPUs, but a BLAS may pick another
            # kernel for batch 1 than for the batched CFG pair (CI measured max-abs 6.2e-06, rel 3.7e-07).
            assert latent_error < 1e-6
            assert latent_max_abs < 1e-4
        else:
            assert latent_error < 1e-5
            print(
                f"{mode} rank {rank}: sharded attention max abs error {result['attention_max_abs_error']:.2e}"
            )
            assert result["attention_max_abs_error"] < 1e-5
        assert error < 1e-5  # the split decode: equal up to rounding
        assert decoded.shape == (9, 48, 64, 3)
        assert file_error < 0.05  # two H.264 pieces joined vs one encode of the same frames
        assert result["cancelled"] is True
        assert result["steps_before_cancel"] == 2  # all ranks stopped after the same step
    # Every rank ends with the same result.
    assert len({r["random_seed"] for r in results}) == 1
    assert len({r["random_digest"] for r in results}) == 1
    for rank in range(1, world_size):
        assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / f"rank{rank}.npy"))
        assert (tmp_path / "rank0.mp4").read_bytes() == (tmp_path / f"rank{rank}.mp4").read_bytes()
    if mode == "cfg":
        for rank in range(world_size):
            vace_latents = np.load(tmp_path / f"rank{rank}-vace-latents.npy")
            assert relative_error(vace_latents, reference["vace_latents"]) < 1e-6  # VACE under the CFG split
            # One process encodes the 9-frame guide twice (kept part, generated part); each rank one of them.
            assert results[rank]["vace_encoded_frames"] == 9
            vace_frames, _ = decode_video((tmp_path / f"rank{rank}-vace.mp4").read_bytes())
            assert vace_frames.shape == (9, 48, 64, 3)
            assert relative_error(vace_frames, reference["vace_frames"]) < 0.05


def _pieces_main(rank: int, world_size: int, port: int, out: str) -> None:
    """Split decode of a deeper Wan VAE at several lengths, and the split MP4 encode, against one process."""
    torch.set_num_threads(1)
    from diffusers import AutoencoderKLWan

    from Wan2GP.parallel import decode_split, encode_mp4_split, init_distributed

    init_distributed(rank, world_size, "127.0.0.1", port, device="cpu")
    torch.manual_seed(0)
    # The Wan2.1 VAE layout (4 stages, 2 time upsamplings, attention in the middle), narrower.
    vae = AutoencoderKLWan(base_dim=8).eval()
    result = {}
    with torch.no_grad():
        for latent_frames in (2, 5, 8):
            z = torch.randn(1, 16, latent_frames, 3, 4)
            split = decode_split(vae, z, rank, world_size)
            if split is None:
                result[str(latent_frames)] = None
                continue
            whole = vae.decode(z).sample
            error = float((split - whole).norm() / whole.norm())
            result[str(latent_frames)] = [list(split.shape), error]
    frames = np.random.default_rng(1).integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)
    joined = encode_mp4_split(frames, 16, rank, world_size)
    Path(out, f"joined{rank}.mp4").write_bytes(joined)
    Path(out, f"pieces{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_split_decode_and_encode_equal_one_process(world_size: int, tmp_path: Path) -> None:
    from Wan2GP.parallel import split_latent_frames
    from Wan2GP.video import encode_mp4

    mp.spawn(_pieces_main, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [json.loads((tmp_path / f"pieces{r}.json").read_text()) for r in range(world_size)]
    for latent_frames, frames in ((2, 5), (5, 17), (8, 29)):
        plan = split_latent_frames(latent_frames, world_size)
        for result in results:
            if plan is None:  # too short to give every rank a frame past frame 0: decoded whole
                assert result[str(latent_frames)] is None
                continue
            shape, error = result[str(latent_frames)]
            print(f"{world_size} ranks, {latent_frames} latent frames: split decode rel. error {error:.2e}")
            assert shape == [1, 3, frames, 24, 32]
            assert error < 1e-5
    assert split_latent_frames(21, 2) == [(0, 11), (11, 21)]  # 41 and 40 output frames
    assert split_latent_frames(2, 2) is None

    frames = np.random.default_rng(1).integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)
    whole, _ = decode_video(encode_mp4(frames, 16))
    joined = [(tmp_path / f"joined{r}.mp4").read_bytes() for r in range(world_size)]
    assert len(set(joined)) == 1  # every rank holds the same file
    decoded, fps = decode_video(joined[0])
    assert decoded.shape == frames.shape and fps == 16
    # Joining re-encodes nothing: the pieces' frames are what one encode gives, up to codec decisions.
    assert relative_error(decoded, whole) < 0.05


def test_plan_degrees_rejects_impossible_splits() -> None:
    assert plan_degrees("cfg", 2) == (2, 1)
    assert plan_degrees("ulysses", 4) == (1, 4)
    assert plan_degrees("cfg+ulysses", 4) == (2, 2)
    with pytest.raises(ValueError, match="mode 'cfg' needs exactly 2 ranks"):
        plan_degrees("cfg", 4)
    with pytest.raises(ValueError, match="mode 'cfg\\+ulysses' needs an even world_size >= 4"):
        plan_degrees("cfg+ulysses", 3)
    with pytest.raises(ValueError, match="mode: 'ring'"):
        plan_degrees("ring", 2)
    assert set(MODES) == {"cfg", "ulysses", "cfg+ulysses"}


def test_a_rank_worker_finds_its_gpu_among_its_replicas() -> None:
    from deployments.multi_gpu import check_gpu_view, replica_gpu_index

    assert replica_gpu_index(["1"], ["0", "1"]) == 1
    assert replica_gpu_index(["5"], ["6", "5"]) == 1  # rank order, whatever the ids
    assert replica_gpu_index(["GPU-b"], ["GPU-a", "GPU-b"]) == 1
    with pytest.raises(RuntimeError, match=r"Ray assigned it \['0', '1'\]"):
        replica_gpu_index(["0", "1"], ["0", "1"])
    with pytest.raises(RuntimeError, match=r"GPU 3 is not among its replica's GPUs \['0', '1'\]"):
        replica_gpu_index(["3"], ["0", "1"])
    assert [check_gpu_view(view) for view in ("replica", "own")] == ["replica", "own"]
    with pytest.raises(ValueError, match="gpu_view: expected 'replica' or 'own', got 'node'"):
        check_gpu_view("node")


def test_what_plans_a_split_loads_no_torch() -> None:
    """A multi-GPU replica's coordinator and the config only plan and check splits: their modules load
    neither torch nor diffusers (≈ 4 s and 300 MB per process otherwise); the rank workers load them."""
    code = (
        "import sys; import deployments.multi_gpu, deployments.config; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_nccl_multicast_stays_off() -> None:
    assert NCCL_SAFE_ENV == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


# ---- the multi-GPU Serve replica, in a real local Ray cluster (fake GPUs, gloo) -------------------------------


@pytest.mark.slow
def test_multi_gpu_replica_serves_one_video_across_two_ranks(tiny_dir: Path, reference) -> None:
    import ray
    from ray import serve

    from deployments.multi_gpu import MultiGpuGenerationDeployment, multi_gpu_options

    ref_frames, _ = decode_video(reference["bytes"])
    start_local_ray(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = MultiGpuGenerationDeployment.options(**multi_gpu_options(2, cpus_per_rank=0.5)).bind(
            family="T2V",
            default_models={"t2v": "tiny-t2v"},
            world_size=2,
            mode="ulysses",
            device="cpu",
            tiny_dir=str(tiny_dir.parent),
            cpus_per_rank=0.5,
        )
        handle = serve.run(app, name="multi_gpu", route_prefix=None)
        stats = handle.stats.remote().result()
        assert [r["rank"] for r in stats["ranks"]] == [0, 1]
        assert len({r["pid"] for r in stats["ranks"]}) == 2  # two worker processes
        # Multicast off; with the replica view (the default) each worker sees both of the replica's GPUs (Ray
        # started it seeing its own alone), both naming them in the same order (rank 0's first).
        assert stats["gpu_view"] == "replica"
        views = {r["env"].pop("CUDA_VISIBLE_DEVICES") for r in stats["ranks"]}
        assert len(views) == 1 and sorted(views.pop().split(",")) == ["0", "1"], stats["ranks"]
        assert all(r["env"] == NCCL_SAFE_ENV for r in stats["ranks"])

        params = {**PARAMS, "num_inference_steps": STEPS}
        events = list(handle.generate.options(stream=True).remote("t2v", params, "task-1"))
        assert [e["event"] for e in events[:-1]] == ["progress"] * STEPS
        assert [e["step"] for e in events[:-1]] == [1, 2, 3]
        done = events[-1]
        assert done["event"] == "done", done
        artifact = done["artifact"]
        assert artifact.filename == "task-1.mp4" and artifact.media_type == "video/mp4"
        assert artifact.metadata["frames"] == 9 and artifact.metadata["seed"] == PARAMS["seed"]
        frames, _ = decode_video(artifact.data)
        assert frames.shape == (9, 48, 64, 3)
        error = relative_error(frames, ref_frames)
        latents = handle.last_latents.remote().result()
        latent_error = relative_error(latents, reference["latents"])
        print(
            f"multi-GPU replica (ulysses, 2 ranks): final latents rel. error {latent_error:.3e}, "
            f"decoded frames {error:.3e}"
        )
        assert latent_error < 1e-5
        assert error < 0.05  # the MP4 is encoded in two pieces (other key frames than one encode)

        # Bad params come back as an error event naming the field; the ranks stay usable.
        bad = list(handle.generate.options(stream=True).remote("t2v", {"prompt": "x", "resolution": "abc"}))
        assert bad[-1]["event"] == "error" and bad[-1]["kind"] == "invalid"
        assert "resolution" in bad[-1]["message"]
        # A caller that uses the frames (a chained travel's segment) asks for them instead of the file: the
        # ranks hand back rank 0's frames unencoded, those the single-process run decoded.
        again = list(handle.generate.options(stream=True).remote("t2v", params, "task-2", None, encode=False))
        assert again[-1]["event"] == "done" and "artifact" not in again[-1]
        rendered = again[-1]["rendered"]
        assert rendered.frames.dtype == np.uint8 and rendered.frames.shape == (9, 48, 64, 3)
        assert rendered.stem == "task-2" and rendered.metadata["seed"] == PARAMS["seed"]
        expected = to_uint8_frames(reference["frames"]).astype(float)
        assert np.abs(rendered.frames.astype(float) - expected).mean() < 1.0  # not an MP4 read back
        assert handle.stats.remote().result()["generations"] == 2

        # Cancelling the request stops every rank at the same step; the replica then serves the next task.
        stream = handle.generate.options(stream=True).remote("t2v", {**params, "num_inference_steps": 200})
        first = next(iter(stream))
        assert first["event"] == "progress"
        stream.cancel()
        after = list(handle.generate.options(stream=True).remote("t2v", params, "task-3"))
        assert after[-1]["event"] == "done"
        assert decode_video(after[-1]["artifact"].data)[0].shape == (9, 48, 64, 3)
        assert handle.stats.remote().result()["generations"] == 3
    finally:
        ray.shutdown()  # the cluster is the test's own: no graceful serve.shutdown needed


def test_uneven_token_split_is_rejected_with_the_size(engine: Engine) -> None:
    from Wan2GP.parallel import check_sequence_split

    engine.load("tiny-t2v")
    check_sequence_split(engine.pipe, 64, 48, 9, 4)  # 36 tokens over 4 ranks: fine
    with pytest.raises(ValueError, match=r"resolution/video_length: 64x48, 9 frames make 36 tokens.*5 ranks"):
        check_sequence_split(engine.pipe, 64, 48, 9, 5)


def test_parallel_engine_needs_the_resident_profile(catalog: Catalog) -> None:
    from Wan2GP.parallel import ParallelEngine

    offloaded = Engine(device="cpu", memory_profile="model_offload", catalog=catalog, lora_dirs=[])
    with pytest.raises(ValueError, match="memory_profile: parallel generation needs 'resident'"):
        ParallelEngine(offloaded, mode="cfg")


def test_parallel_engine_decodes_every_rank_the_same_way(catalog: Catalog) -> None:
    from Wan2GP.acceleration import AccelerationConfig
    from Wan2GP.parallel import ParallelEngine, ParallelLayout

    engine = Engine(
        device="cpu", catalog=catalog, lora_dirs=[], acceleration=AccelerationConfig(vae_tiling=True)
    )
    layout = ParallelLayout("cfg", 0, 1, torch.device("cpu"), 1, 1, None)
    ParallelEngine(engine, layout=layout, split_encode=False)
    assert engine.acceleration.vae_tiling is False  # no per-rank memory decision inside a collective decode


@pytest.mark.slow
def test_app_with_a_two_gpu_replica_completes_tasks_over_http(tmp_path: Path) -> None:
    """`gpus_per_replica: 2` in the application config: the ingress routes to the multi-GPU replica."""
    from hwgp_testing import running_app, wait_final
    from Wan2GP.video import probe_video

    config = {
        "db": f"sqlite:///{tmp_path / 'tasks.db'}",
        "storage": {"root": str(tmp_path / "files")},
        "models": "tiny",
        "deployments": {
            "T2V": {"gpus_per_replica": 2, "parallel_mode": "cfg", "num_cpus": 0.3, "device": "cpu"}
        },
    }
    with running_app(config) as client:
        params = {
            "prompt": "split",
            "resolution": "64x48",
            "video_length": 9,
            "num_inference_steps": 2,
            "seed": 5,
        }
        created = client.post("/tasks", json={"task_type": "t2v", "params": params})
        assert created.status_code == 201, created.text
        task = wait_final(client, created.json()["id"])
        assert task["status"] == "Complete", task["error_message"]
        info = probe_video(client.get(f"/tasks/{task['id']}/output").content)
        assert (info["frames"], info["width"], info["height"]) == (9, 64, 48)
        # VACE is not served by this app: its task types are refused at the API.
        assert client.post("/tasks", json={"task_type": "vace", "params": {}}).status_code == 422
