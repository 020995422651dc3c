"""Test helpers for LoRAs by URL: a loopback HTTP server that counts downloads, and a tiny Wan LoRA written
in ComfyUI key format (``diffusion_model.blocks.N.self_attn.q.lora_down.weight``) from the tiny
transformer's own module names."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from safetensors.torch import save

# diffusers module -> the original (ComfyUI / LightX2V) name of the same Linear
_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJECTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
_DIFFUSERS_NAME = re.compile(r"^blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$")


def comfyui_wan_lora(transformer: torch.nn.Module, rank: int = 2, seed: int = 0, scale: float = 0.5) -> bytes:
    """A random LoRA for every attention projection of ``transformer``, saved with ComfyUI keys and alphas."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        match = _DIFFUSERS_NAME.match(name)
        if match is None or not isinstance(module, torch.nn.Linear):
            continue
        block, attention, projection = match.groups()
        key = f"diffusion_model.blocks.{block}.{_ATTENTION[attention]}.{_PROJECTION[projection]}"
        down = torch.randn(rank, module.in_features, generator=generator) * scale
        up = torch.randn(module.out_features, rank, generator=generator) * scale
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    assert tensors, "no attention projections found"
    return save(tensors)


@contextmanager
def serving(files: dict[str, bytes]) -> Iterator[tuple[str, Counter]]:
    """Serve ``files`` (path -> bytes) on 127.0.0.1; yields the base URL and a counter of GETs per path."""
    hits: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            hits[self.path] += 1
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
