"""One GPU, two probes the served benchmarks don't cover: the 14B transformer at 720p, and the VAE decode.

    python -m bench.gpu_probes [--sections 14b,vae,vae-compile] [--json out.json]
    python -m bench.gpu_probes --tiny      # CPU smoke check: tiny shapes

``14b``: the Wan2.1-T2V-14B transformer architecture (random bf16 weights, built on the GPU) at 1280x720, 81
frames, 512 text tokens: seconds per transformer forward and per CFG step (two forwards, as the pipeline
runs them), and peak GPU memory with everything resident. The UMT5-XXL text encoder (5.7 B parameters,
11.4 GB in bf16) and the VAE add to that in the service; they are counted, not built (random weights don't
change their size).

``vae``: the Wan2.1 VAE decode of an 81-frame latent at 832x480 and 1280x720, float32 (the served path) vs
``channels_last_3d`` and vs bfloat16, each with its seconds, peak GiB and relative error vs float32.
``vae-compile``: the float32 decoder under ``torch.compile`` (first call compiles; reported separately).
Each result is printed as soon as it is measured and the JSON is rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import WAN_1_3B, cuda_sync, peak_gib, peak_reset, relative_error

# Wan2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json).
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
UMT5_XXL_PARAMS = 5.68e9

RESULTS: dict = {"14b": {}, "vae": []}


def probe_14b(args, device: str, save) -> None:
    from diffusers import WanTransformer3DModel

    config = dict(WAN_14B)
    if args.tiny:
        config.update(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, text_dim=32)
    width, height, frames = (64, 48, 9) if args.tiny else (1280, 720, 81)
    peak_reset()
    start = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built straight in bf16: no float32 copy of 14 B parameters
    try:
        with torch.device(device):
            transformer = WanTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in transformer.parameters())
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    print(f"14b: built {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.1f}s", flush=True)
    latent_frames = (frames - 1) // 4 + 1
    generator = torch.Generator("cpu").manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], generator=generator),
    }
    inputs = {k: v.to(device, torch.bfloat16) for k, v in inputs.items()}
    inputs["timestep"] = torch.tensor([500.0], device=device)
    with torch.no_grad():
        transformer(**inputs, return_dict=False)  # warm: kernels, allocator
        cuda_sync()
        times = []
        for _ in range(args.forwards):
            start = time.perf_counter()
            transformer(**inputs, return_dict=False)
            cuda_sync()
            times.append(time.perf_counter() - start)
    forward = min(times)
    tokens = latent_frames * (height // 16) * (width // 16)
    RESULTS["14b"] = {
        "parameters": params,
        "resolution": f"{width}x{height}",
        "frames": frames,
        "tokens": tokens,
        "forward_s": forward,
        "forward_all_s": times,
        "s_per_cfg_step": 2 * forward,
        "transformer_weights_gib": weights_gib,
        "peak_gib_transformer": peak_gib(),
        "text_encoder_gib_bf16": UMT5_XXL_PARAMS * 2 / 2**30,
    }
    peak = peak_gib()
    print(f"14b: {width}x{height}x{frames} ({tokens} tokens): {forward:.2f} s/forward, {2 * forward:.2f} s per CFG "
          f"step; weights {weights_gib or 0:.1f} GiB, peak {peak or 0:.1f} GiB (transformer + activations); "
          f"+{RESULTS['14b']['text_encoder_gib_bf16']:.1f} GiB UMT5-XXL resident in the service", flush=True)  # fmt: skip
    del transformer, inputs
    save()


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]


def probe_vae(args, device: str, save, compiled: bool) -> None:
    from diffusers import AutoencoderKLWan

    from Wan2GP.acceleration import channels_last_convolutions

    sizes = [(64, 48, 9)] if args.tiny else [(832, 480, 81), (1280, 720, 81)]
    torch.manual_seed(0)
    base = AutoencoderKLWan().to(device).eval()
    for width, height, frames in sizes:
        generator = torch.Generator("cpu").manual_seed(2)
        latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=generator)
        reference = None
        variants = ["compiled float32"] if compiled else ["float32", "float32 channels_last_3d", "bfloat16"]
        for variant in variants:
            vae, dtype = base, torch.float32
            if variant == "bfloat16":
                vae, dtype = AutoencoderKLWan().to(device, torch.bfloat16).eval(), torch.bfloat16
                vae.load_state_dict(base.state_dict())
            if "channels_last" in variant:
                channels_last_convolutions(base)
            if compiled:
                vae.decoder = torch.compile(base.decoder)
            peak_reset()
            x = latents.to(device, dtype)
            start = time.perf_counter()
            out = _decode(vae, x)  # first call (compiles when compiled)
            cuda_sync()
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = _decode(vae, x)
            cuda_sync()
            seconds = time.perf_counter() - start
            out = out.float().cpu()
            if variant == "float32":
                reference = out
            error = None if reference is None else relative_error(out.numpy(), reference.numpy())
            row = {"size": f"{width}x{height}x{frames}", "variant": variant, "decode_s": seconds,
                   "first_call_s": first, "peak_gib": peak_gib(), "rel_error_vs_float32": error}  # fmt: skip
            RESULTS["vae"].append(row)
            err = "" if error is None else f", rel. error vs float32 {error:.2e}"
            peak = row["peak_gib"] or 0
            print(f"vae {row['size']} {variant}: {seconds:.2f}s (first call {first:.2f}s), peak {peak:.1f} GiB{err}",
                  flush=True)  # fmt: skip
            save()
            if "channels_last" in variant:
                channels_last_convolutions(base, torch.contiguous_format)
            if compiled:
                vae.decoder = base.decoder._orig_mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="14b,vae,vae-compile")
    parser.add_argument("--forwards", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shapes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    RESULTS["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(RESULTS, indent=2, default=str))

    sections = args.sections.split(",")
    if "14b" in sections:
        probe_14b(args, device, save)
    if "vae" in sections:
        probe_vae(args, device, save, compiled=False)
    if "vae-compile" in sections:
        probe_vae(args, device, save, compiled=True)


if __name__ == "__main__":
    main()
