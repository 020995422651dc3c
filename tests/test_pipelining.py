"""Issue 21.5 on CPU with the tiny models: the engine's frames before encoding (uint8 on the device), the
encode as a separate stage with the same bytes, and the per-prompt text-embedding cache."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_dispatcher import in_loop, make_dispatcher, statuses, until

from db.store import open_store
from deployments import dispatcher as dispatcher_module
from deployments.config import DeploymentConfig
from deployments.dispatcher import Job, RunResult
from Wan2GP.acceleration import AccelerationConfig, PromptCache
from Wan2GP.artifact import Artifact, Rendered
from Wan2GP.catalog import Catalog
from Wan2GP.engine import Engine
from Wan2GP.parallel import wrap_vae_decode
from Wan2GP.video import decode_video, to_uint8_frames

pytest_plugins = ["engine_fixtures"]

PARAMS = {"model": "tiny-t2v", "prompt": "a cat", "resolution": "64x48", "video_length": 9, "seed": 1,
          "num_inference_steps": 2}  # fmt: skip


def test_uint8_on_the_device_equals_the_numpy_conversion():
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(5, 3, 6, 8, generator=generator)  # channels first, as output_type="pt" gives
    video[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # halves: round to even
    video[1, 0, 0, :2] = torch.tensor([-0.005, 1.005])  # VAE rounding past [0, 1] is clipped
    on_device = to_uint8_frames(video)
    on_host = to_uint8_frames(video.permute(0, 2, 3, 1).numpy())
    assert on_device.dtype == np.uint8 and on_device.shape == (5, 6, 8, 3)
    assert np.array_equal(on_device, on_host)
    bf16 = video.to(torch.bfloat16)  # a GPU VAE's dtype
    assert np.array_equal(to_uint8_frames(bf16), to_uint8_frames(bf16.float().permute(0, 2, 3, 1).numpy()))
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_uint8_frames(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        to_uint8_frames(torch.full((1, 3, 2, 2), 2.0))


def test_render_returns_frames_and_their_encode_is_what_generate_returns(engine: Engine):
    rendered = engine.render("t2v", PARAMS, task_id="t1")
    assert isinstance(rendered, Rendered)
    assert rendered.frames.dtype == np.uint8 and rendered.frames.shape == (9, 48, 64, 3)
    assert "encode_file" not in rendered.metadata["timings"]  # nothing encoded on the replica's time
    artifact = rendered.encode()
    assert artifact.filename == "t1.mp4" and artifact.media_type == "video/mp4"
    assert artifact.metadata["timings"]["encode_file"] >= 0
    assert engine.generate("t2v", PARAMS, task_id="t1").data == artifact.data  # same seed, same bytes
    decoded, _ = decode_video(artifact.data)
    assert np.abs(decoded.astype(int) - rendered.frames.astype(int)).mean() < 8  # the MP4 of these frames

    image = engine.render("flux", {"model": "tiny-flux", "prompt": "a dog", "resolution": "32x32", "seed": 2,
                                   "num_inference_steps": 2}, task_id="i1")  # fmt: skip
    assert image.frames.shape == (1, 32, 32, 3)
    png = image.encode()
    assert png.filename == "i1.png" and png.media_type == "image/png"
    assert np.array_equal(_png(png.data), image.frames[0])  # PNG is lossless


def _png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _text_encoder_calls(engine: Engine) -> list[int]:
    calls = [0]
    engine.pipe.text_encoder.register_forward_pre_hook(
        lambda module, args: calls.__setitem__(0, calls[0] + 1)
    )
    return calls


def _latents(engine: Engine, params: dict):
    recorder = wrap_vae_decode(engine.pipe.vae)
    rendered = engine.render("t2v", params)
    return recorder.last_latents.clone(), rendered


def test_a_repeated_prompt_skips_the_text_encoder_and_gives_the_same_latents(catalog: Catalog):
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[])
    engine.load("tiny-t2v")
    calls = _text_encoder_calls(engine)
    first_latents, first = _latents(engine, PARAMS)
    assert calls[0] > 0  # the prompt and the negative prompt
    assert first.metadata["acceleration"]["text_encode_cache"] == {"hits": 0, "misses": 1}
    encoder_calls = calls[0]

    second_latents, second = _latents(engine, PARAMS)
    assert calls[0] == encoder_calls  # the text encoder ran zero times
    assert second.metadata["acceleration"]["text_encode_cache"] == {"hits": 1, "misses": 0}
    assert torch.equal(second_latents, first_latents)
    assert np.array_equal(second.frames, first.frames)

    # Another negative prompt (or prompt, or CFG on/off) is another key.
    other = engine.render("t2v", {**PARAMS, "negative_prompt": "blurry"})
    assert other.metadata["acceleration"]["text_encode_cache"] == {"hits": 0, "misses": 1}
    assert calls[0] == 2 * encoder_calls

    # A model switch clears it: the other model's text encoder may differ.
    engine.load("tiny-t2v-22")
    assert len(engine.prompt_cache) == 0
    engine.load("tiny-t2v")
    calls = _text_encoder_calls(engine)
    again = engine.render("t2v", PARAMS)
    assert again.metadata["acceleration"]["text_encode_cache"] == {"hits": 0, "misses": 1}
    assert calls[0] == encoder_calls


def test_the_prompt_cache_is_bounded_and_can_be_off(catalog: Catalog):
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[], prompt_cache_entries=1)
    for prompt in ("a", "b", "a"):
        rendered = engine.render("t2v", {**PARAMS, "prompt": prompt})
        assert rendered.metadata["acceleration"]["text_encode_cache"] == {"hits": 0, "misses": 1}
    assert len(engine.prompt_cache) == 1
    off = Engine(device="cpu", catalog=catalog, lora_dirs=[], prompt_cache_entries=0)
    off.render("t2v", PARAMS)
    rendered = off.render("t2v", PARAMS)
    assert rendered.metadata["acceleration"]["text_encode_cache"] == {"hits": 0, "misses": 0}
    with pytest.raises(ValueError, match="prompt_cache_entries"):
        PromptCache(-1)


def test_deployment_config_checks_compile_and_the_attention_backend():
    assert DeploymentConfig().compile is False and DeploymentConfig().attention_backend is None
    assert DeploymentConfig(attention_backend="_native_cudnn").attention_backend == "_native_cudnn"
    with pytest.raises(ValidationError, match="attention_backend: 'fastest' is not one of"):
        DeploymentConfig(attention_backend="fastest")
    with pytest.raises(ValidationError, match="compile: needs memory_profile 'resident'"):
        DeploymentConfig(compile=True, memory_profile="cpu")
    with pytest.raises(ValidationError, match="compile: not available on multi-GPU replicas"):
        DeploymentConfig(compile=True, gpus_per_replica=2)
    with pytest.raises(ValidationError, match="compile"):
        DeploymentConfig(compile="sometimes")
    assert DeploymentConfig().vae_tiling == "auto" and DeploymentConfig(vae_tiling=True).vae_tiling is True
    with pytest.raises(ValidationError, match="vae_tiling"):
        DeploymentConfig(vae_tiling="sometimes")


def test_compiled_engine_compiles_once_and_auto_stays_eager_on_cpu(catalog: Catalog, tmp_path):
    from torch._dynamo.utils import counters

    config = AccelerationConfig(compile=True, inductor_cache_dir=str(tmp_path / "inductor"))
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[], acceleration=config)
    first = engine.render("t2v", PARAMS)
    assert first.metadata["acceleration"]["compiled"] == ["transformer"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    second = engine.render("t2v", {**PARAMS, "seed": 2, "prompt": "a dog"})  # same shapes: no recompile
    assert counters["stats"]["unique_graphs"] == graphs
    assert not np.array_equal(second.frames, first.frames)

    auto = Engine(
        device="cpu", catalog=catalog, lora_dirs=[], acceleration=AccelerationConfig(compile="auto")
    )
    assert auto.render("t2v", PARAMS).metadata["acceleration"]["compiled"] == []


def test_compile_auto_is_on_for_a_resident_gpu_only():
    assert AccelerationConfig(compile="auto").check("resident", "cpu").compile is False
    assert AccelerationConfig(compile="auto").check("resident", "cuda:0").compile is True
    assert AccelerationConfig(compile="auto").check("model_offload", "cuda").compile is False
    with pytest.raises(ValueError, match="compile: must be true, false or 'auto'"):
        AccelerationConfig(compile="yes").check("resident", "cpu")


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as opened:
        yield opened


@pytest.fixture
def running() -> list:
    return []  # dispatchers a test started: `in_loop` stops them


class PipelinedGpu:
    """A runner standing in for GenerationRunner: 'generates' (one at a time is all the capacity allows),
    hands the replica back (`job.gpu_done()`), then waits for its encode to be let through."""

    def __init__(self):
        self.generating = 0
        self.peak = 0
        self.encoding: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def run(self, job: Job) -> RunResult:
        task_id = job.task.id
        self.generating += 1
        self.peak = max(self.peak, self.generating)
        await asyncio.sleep(0.02)
        self.generating -= 1
        job.gpu_done()
        self.encoding.append(task_id)
        gate = self.gates.setdefault(task_id, asyncio.Event())
        await gate.wait()
        return RunResult(Artifact(b"video of " + task_id.encode(), f"{task_id}.mp4", "video/mp4", {}), "fake")


@in_loop
async def test_the_deployment_takes_the_next_task_while_the_last_one_encodes(store, tmp_path, running):
    gpu = PipelinedGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    ids = [store.add("t2v", {"prompt": f"cat {i}"}).id for i in range(4)]
    dispatcher.start()
    running.append(dispatcher)
    # Capacity 1, yet all four generated while none has been encoded: each one freed the replica for the next.
    await until(lambda: len(gpu.encoding) == 4)
    assert gpu.peak == 1
    assert gpu.encoding == ids  # claimed and generated in queue order
    for task_id in reversed(ids):  # encodes finishing in any order lose nothing
        gpu.gates[task_id].set()
    await until(lambda: statuses(store) == {"Complete": 4})
    for task_id in ids:
        assert (
            tmp_path / "files" / task_id / f"{task_id}.mp4"
        ).read_bytes() == b"video of " + task_id.encode()


@in_loop
async def test_the_cpu_stage_is_bounded(store, tmp_path, running, monkeypatch):
    monkeypatch.setattr(dispatcher_module, "CPU_STAGE_LIMIT", 2)
    gpu = PipelinedGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    ids = [store.add("t2v", {"prompt": f"cat {i}"}).id for i in range(4)]
    dispatcher.start()
    running.append(dispatcher)
    # Two wait in the CPU stage; the third keeps the deployment's capacity until its own encode ends.
    await until(lambda: len(gpu.encoding) == 3)
    await asyncio.sleep(0.2)
    assert gpu.encoding == ids[:3]
    gpu.gates[ids[2]].set()
    await until(lambda: len(gpu.encoding) == 4)
    for task_id in ids:
        gpu.gates.setdefault(task_id, asyncio.Event()).set()
    await until(lambda: statuses(store) == {"Complete": 4})
