"""LoRAs by URL without Ray: POST checks, guarded downloads into the cache, pins, the replica's folder, and
ComfyUI-format keys loading into the tiny Wan model (deployments/lora_fetch.py)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_server import comfyui_wan_lora, serving
from safetensors.torch import save

from deployments.errors import InvalidTask
from deployments.lora_fetch import (
    LoraFetcher,
    LoraSettings,
    check_safetensors_header,
    content_name,
    lora_urls,
    store_lora_files,
)
from storage import InputError
from Wan2GP.engine import Engine
from Wan2GP.video import decode_video

pytest_plugins = ["engine_fixtures"]

LORA = save({"w": torch.ones(2, 2)})
SHA = hashlib.sha256(LORA).hexdigest()


@pytest.fixture
def server():
    files = {"/lora/style.safetensors": LORA, "/lora/fake.safetensors": b"<html>not a lora</html>"}
    with serving(files) as (base, hits):
        yield base, hits


def fetcher_for(base: str, tmp_path: Path, **settings) -> LoraFetcher:
    host = base.removeprefix("http://")
    return LoraFetcher(
        LoraSettings(**settings), cache_dir=tmp_path / "cache", env={"HWGP_INPUT_URL_ALLOW": host}
    )


def test_lora_urls_parse_pins_and_refuse_other_formats():
    url = "https://hf.co/x/Lightning.safetensors"
    found = lora_urls({"activated_loras": [f"{url}#sha256={SHA.upper()}", "local-name"]})
    assert [(u.field, u.url, u.sha256) for u in found] == [("activated_loras", url, SHA)]
    with pytest.raises(InputError, match=r"^additional_loras: a LoRA URL must name a \.safetensors"):
        lora_urls({"additional_loras": {"https://hf.co/x/model.ckpt": 1.0}})
    with pytest.raises(InputError, match=r"^lora_names: a LoRA URL's fragment must be '#sha256="):
        lora_urls({"lora_names": f"{url}#sha256=abc"})


def test_safetensors_header_is_checked(tmp_path):
    good = tmp_path / "good.safetensors"
    good.write_bytes(LORA)
    check_safetensors_header(good)
    for name, data in {
        "short": b"\x01\x00",
        "html": b"<html>not a lora</html>",
        "huge_length": (10**12).to_bytes(8, "little") + b"{}",
        "not_json": (4).to_bytes(8, "little") + b"abcd",
        "json_list": (2).to_bytes(8, "little") + b"[]",
    }.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="not a safetensors file"):
            check_safetensors_header(bad)


def test_post_checks_refuse_private_hosts_and_off_downloads(server, tmp_path):
    base, hits = server
    url = f"{base}/lora/style.safetensors"
    fetcher_for(base, tmp_path).check({"activated_loras": [url]})  # allowlisted loopback: accepted
    open_fetcher = LoraFetcher(cache_dir=tmp_path / "c2", env={})
    with pytest.raises(InvalidTask) as refused:
        open_fetcher.check({"activated_loras": ["http://10.1.2.3/a.safetensors"]})
    assert refused.value.field == "params.activated_loras" and "not allowed" in str(refused.value)
    off = fetcher_for(base, tmp_path, allow_url_downloads=False)
    with pytest.raises(InvalidTask, match="downloads are off") as refused:
        off.check({"additional_loras": {url: 0.5}})
    assert refused.value.field == "params.additional_loras"
    with pytest.raises(InvalidTask) as refused:
        open_fetcher.check({"activated_loras": [f"{base}/lora/style.pt"]})
    assert refused.value.field == "params.activated_loras"
    assert sum(hits.values()) == 0  # checks never download


def test_fetch_replaces_urls_by_content_names_and_reuses_the_cache(server, tmp_path):
    base, hits = server
    url = f"{base}/lora/style.safetensors"
    fetcher = fetcher_for(base, tmp_path)
    params = {"prompt": "p", "activated_loras": [f"{url}#sha256={SHA}"], "additional_loras": {url: 0.3}}
    replaced, files = fetcher.fetch(params)
    assert replaced["activated_loras"] == [content_name(SHA)]
    assert replaced["additional_loras"] == {content_name(SHA): 0.3}
    assert files == {content_name(SHA): LORA}
    again, _ = fetcher.fetch({"lora_names": url})
    assert again["lora_names"] == content_name(SHA)
    assert hits["/lora/style.safetensors"] == 1


def test_fetch_fails_naming_the_field(server, tmp_path):
    base, _ = server
    fetcher = fetcher_for(base, tmp_path)
    wrong = "0" * 64
    with pytest.raises(InputError, match=rf"^activated_loras: sha256 mismatch: the URL pins {wrong}"):
        fetcher.fetch({"activated_loras": [f"{base}/lora/style.safetensors#sha256={wrong}"]})
    with pytest.raises(InputError, match=r"^activated_loras: the URL's file is not a safetensors file"):
        fetcher.fetch({"activated_loras": [f"{base}/lora/fake.safetensors"]})
    small = fetcher_for(base, tmp_path / "small", max_lora_bytes=16)
    with pytest.raises(InputError, match=r"^activated_loras: the file is larger than the limit of 16 bytes"):
        small.fetch({"activated_loras": [f"{base}/lora/style.safetensors"]})
    with pytest.raises(InputError, match=r"^activated_loras: could not fetch the URL"):
        fetcher.fetch({"activated_loras": [f"{base}/lora/missing.safetensors"]})


def test_replica_folder_writes_once_checks_digests_and_evicts(tmp_path):
    folder = tmp_path / "loras"
    assert store_lora_files(folder, {content_name(SHA): LORA}) == [content_name(SHA)]
    reads = []
    assert store_lora_files(folder, {content_name(SHA): "ref"}, read=reads.append) == []  # already there
    assert reads == []  # a file the folder holds is never pulled again
    with pytest.raises(ValueError, match="do not have that sha256"):
        store_lora_files(folder, {content_name("1" * 64): LORA})
    with pytest.raises(ValueError, match="is not <sha256>.safetensors"):
        store_lora_files(folder, {"../x.safetensors": LORA})
    other = save({"w": torch.zeros(3)})
    old = folder / content_name(SHA)
    os.utime(old, (time.time() - 100, time.time() - 100))
    store_lora_files(folder, {content_name(hashlib.sha256(other).hexdigest()): other}, max_bytes=len(other))
    assert not old.exists() and len(list(folder.iterdir())) == 1


def test_comfyui_keys_load_into_the_tiny_wan_model(catalog, tmp_path):
    """diffusers' Wan loader converts ComfyUI keys itself: the LoRA changes the output by name."""
    folder = tmp_path / "loras"
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[folder])
    params = {"model": "tiny-t2v", "prompt": "a cat", "seed": 3, "video_length": 5}
    baseline = engine.generate("t2v", params)
    data = comfyui_wan_lora(engine.pipe.transformer)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert any(key.startswith("diffusion_model.blocks.0.self_attn.q.lora_down") for key in header)
    name = content_name(hashlib.sha256(data).hexdigest())
    store_lora_files(folder, {name: data})
    with_lora = engine.generate("t2v", {**params, "activated_loras": [name], "loras_multipliers": "1.0"})
    assert with_lora.metadata["loras"] == [{"file": name, "multiplier": 1.0}]
    difference = np.abs(
        decode_video(with_lora.data)[0].astype(np.int16) - decode_video(baseline.data)[0].astype(np.int16)
    ).mean()
    assert difference > 0.5


def test_downloads_off_is_a_422_at_post(tmp_path):
    """The api maps the refusal to 422 naming the field, and nothing is queued."""
    from fastapi.testclient import TestClient

    from db.store import open_store
    from deployments.api import create_app
    from deployments.config import TINY_DEFAULT_MODELS, AppConfig, IngressConfig
    from deployments.dispatcher import BlockingPool, Dispatcher
    from deployments.routing import Routing
    from storage import InputFetcher, OutputStorage, StorageConfig
    from Wan2GP.catalog import Catalog

    config = AppConfig.model_validate({"loras": {"allow_url_downloads": False}})
    models = {key: model for group in TINY_DEFAULT_MODELS.values() for key, model in group.items()}
    storage = OutputStorage(StorageConfig(root=str(tmp_path / "files")))
    routing = Routing(
        Catalog.load(None), models, InputFetcher([]), ["T2V"], loras=LoraFetcher(config.loras, env={})
    )
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as store:
        dispatcher = Dispatcher(
            store, storage, routing, {}, {"T2V": 1}, IngressConfig(), pool=BlockingPool(2)
        )
        app = create_app(
            store=store,
            storage=storage,
            routing=routing,
            dispatcher=dispatcher,
            pool=dispatcher.pool,
            max_request_bytes=100_000,
        )
        with TestClient(app) as client:
            url = "https://example.com/lora/style.safetensors"
            response = client.post(
                "/tasks", json={"task_type": "t2v", "params": {"prompt": "a", "activated_loras": [url]}}
            )
            assert response.status_code == 422, response.text
            assert "activated_loras" in response.text and "downloads are off" in response.text
            assert client.get("/tasks").json() == []


def test_travel_orchestrator_details_are_fetched_and_replaced(server, tmp_path):
    base, hits = server
    url = f"{base}/lora/style.safetensors"
    params = {"orchestrator_details": {"prompt": "p", "additional_loras": {url: 0.7}, "run_id": "r"}}
    assert [u.field for u in lora_urls(params)] == ["orchestrator_details.additional_loras"]
    replaced, files = fetcher_for(base, tmp_path).fetch(params)
    assert replaced["orchestrator_details"] == {
        "prompt": "p",
        "additional_loras": {content_name(SHA): 0.7},
        "run_id": "r",
    }
    assert params["orchestrator_details"]["additional_loras"] == {url: 0.7}  # the task's own params kept
    assert list(files) == [content_name(SHA)] and hits["/lora/style.safetensors"] == 1
    with pytest.raises(InvalidTask) as refused:
        fetcher_for(base, tmp_path, allow_url_downloads=False).check(params)
    assert refused.value.field == "params.orchestrator_details.additional_loras"
