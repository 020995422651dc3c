"""What the GPU benchmarks share: the full-size random-weight model builds, the GPU check, the model catalog
entries, the local Ray cluster and service, and the error measures. Bench scripts import this, never each
other.

The transformer and VAE have the real Wan2.1 1.3B configuration; the text encoder is the real UMT5 class with
the real output width (4096) but a single small layer, since its weights are random anyway and it runs once
per task. Nothing is downloaded: the weights are built on the GPU in seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

T2V_MODEL = "bench-wan2.1-t2v-1.3b"
VACE_MODEL = "bench-wan2.1-vace-1.3b"
PROMPT = "a cat walking in the city at night, cinematic"

# Wan2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json).
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TEXT_TOKENS = 512


def relative_error(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def max_abs_error(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def cuda_sync() -> None:
    """Wait for the GPU's queued work (timings end there); nothing on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> None:
    """Free what Python and the caching allocator hold, and restart the peak-memory count."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """The GPU memory peak since :func:`peak_reset`, GiB (None on a CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def require_gpus(needed: int, tiny: bool, script: str) -> int:
    """The GPUs to use; exit at once with a clear message when fewer than ``needed`` are present."""
    if tiny:
        return needed  # fake GPUs of a local Ray cluster, models on CPU
    import torch

    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if present < needed:
        sys.exit(
            f"{script}: needs {needed} GPUs, found {present}. Run it on a multi-GPU machine "
            f"(e.g. the device kind nvidia-h200-x{max(2, needed)}), or pass --tiny for a CPU smoke check."
        )
    return needed


def _text_encoder():
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(vocab_size=256, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2)
    ).to(torch.bfloat16)


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def build_t2v(folder: Path) -> None:
    """Save a random-weight Wan2.1 T2V 1.3B pipeline in diffusers format (bf16 transformer, fp32 VAE)."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    from Wan2GP.tiny import build_t5_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 1.3B parameters is much faster on the GPU
        transformer = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16)
        vae = AutoencoderKLWan()  # the default config is Wan2.1's VAE
    WanPipeline(
        tokenizer=build_t5_tokenizer(),
        text_encoder=_text_encoder(),
        vae=vae,
        scheduler=_scheduler(),
        transformer=transformer,
    ).save_pretrained(str(folder))


def build_vace(folder: Path) -> None:
    """A random-weight pipeline with the Wan2.1-VACE-1.3B architecture (transformer bf16, VAE fp32)."""
    import torch
    from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

    from Wan2GP.tiny import build_t5_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        # Wan2.1-VACE-1.3B: the T2V 1.3B blocks plus VACE blocks on every other layer, 96 control channels.
        transformer = WanVACETransformer3DModel(
            **WAN_1_3B, vace_layers=list(range(0, 30, 2)), vace_in_channels=96
        ).to(torch.bfloat16)
        vae = AutoencoderKLWan()
    WanVACEPipeline(
        tokenizer=build_t5_tokenizer(),
        text_encoder=_text_encoder(),
        vae=vae,
        scheduler=_scheduler(),
        transformer=transformer,
    ).save_pretrained(str(folder))


def transformer_flops(width: int, height: int, frames: int) -> float:
    """FLOPs of one 1.3B transformer forward pass (matmuls and attention; norms and elementwise ignored)."""
    c = WAN_1_3B
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    tokens = ((frames - 1) // 4 + 1) * (height // 8 // 2) * (width // 8 // 2)
    per_layer = (
        2 * 4 * tokens * dim * dim  # self-attention q, k, v, out projections
        + 2 * 2 * tokens * tokens * dim  # self-attention scores and weighted sum
        + 2 * 2 * tokens * dim * dim  # cross-attention q, out
        + 2 * 2 * TEXT_TOKENS * dim * dim  # cross-attention k, v on the text
        + 2 * 2 * tokens * TEXT_TOKENS * dim  # cross-attention scores and sum
        + 2 * 2 * tokens * dim * c["ffn_dim"]  # feed-forward
    )
    return float(per_layer * c["num_layers"])


def models_root(default: Path) -> Path:
    """Where the random weights are built: ``$HWGP_BENCH_MODELS`` (shared by the scripts of one device call,
    so each builds once) or ``default``."""
    return Path(os.environ.get("HWGP_BENCH_MODELS") or default)


def prepare_models(root: Path, tiny: bool, families: tuple[str, ...] = ("t2v",)) -> tuple[str, dict]:
    """``(models_dir, {family: model_id})``: a model JSON per family under ``root/models`` whose weights are
    full-size random ones built under ``root`` (once: an existing build is reused), or (``tiny``) the tiny
    models' folders: the service loads them like any local weights, through the same catalog path."""
    models_dir = root / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    ids = {}
    for family in families:
        model_id, pipeline = (
            (T2V_MODEL, "WanPipeline") if family == "t2v" else (VACE_MODEL, "WanVACEPipeline")
        )
        if tiny:
            from Wan2GP.tiny import ensure_tiny_models

            folder, dtype = ensure_tiny_models() / family, "float32"
        else:
            folder, dtype = root / model_id, "bfloat16"
            if not (folder / "model_index.json").exists():
                start = time.perf_counter()
                (build_t2v if family == "t2v" else build_vace)(folder)
                print(f"built {model_id} (random weights) in {time.perf_counter() - start:.0f}s", flush=True)
        definition = {
            "id": model_id,
            "family": family,
            "pipeline": pipeline,
            "source": str(folder),
            "dtype": dtype,
            "component_dtypes": {"vae": "float32"},
            "defaults": {"num_inference_steps": 10, "guidance_scale": 5.0, "flow_shift": 3.0,
                         "width": 832, "height": 480, "fps": 16, "frames": 81},
        }  # fmt: skip
        (models_dir / f"{model_id}.json").write_text(json.dumps(definition, indent=2))
        ids[family] = model_id
    if not tiny:
        import torch

        torch.cuda.empty_cache()  # the build ran on GPU 0; leave it to the replicas
    return str(models_dir), ids


def start_ray(gpus: int) -> None:
    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )


def app_config(
    tmp: Path, name: str, deployments: dict[str, dict], models_dir: str, tiny: bool, **extra: Any
) -> dict[str, Any]:
    """The application config of one benchmark run (SQLite under ``tmp``, fast polling)."""
    return {
        "db": f"sqlite:///{tmp}/tasks-{name}.db",
        "storage": {"root": str(tmp / "files")},
        "models": "tiny" if tiny else "real",
        "models_dir": models_dir,
        "deployments": deployments,
        "ingress": {"poll_interval_s": 0.05},
        **extra,
    }


def run_app(config: dict[str, Any], port: int):
    """Deploy the application; an HTTP client for it."""
    import httpx
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(config), name="hwgp", route_prefix="/")
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)


def post(client, task_type: str, params: dict) -> str:
    response = client.post("/tasks", json={"task_type": task_type, "params": params})
    response.raise_for_status()
    return response.json()["id"]


def model_label(tiny: bool, family: str = "t2v") -> str:
    name = "Wan2.1-T2V-1.3B" if family == "t2v" else "Wan2.1-VACE-1.3B"
    return "tiny model, CPU (smoke check)" if tiny else f"{name} architecture, random weights"
