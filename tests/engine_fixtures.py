"""Fixtures of the engine tests: tiny models built once per session and shared by every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from Wan2GP.catalog import Catalog
from Wan2GP.engine import Engine
from Wan2GP.tiny import ensure_tiny_models

TINY_DEFAULTS = {
    "t2v": "tiny-t2v",
    "i2v": "tiny-i2v",
    "flf2v": "tiny-flf2v",
    "vace": "tiny-vace",
    "flux": "tiny-flux",
    "flux_kontext": "tiny-flux-kontext",
    "t2v_22": "tiny-t2v-22",
    "i2v_22": "tiny-i2v-22",
    "vace_22": "tiny-vace-22",
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Every tiny model, built once per session (or reused from $HWGP_TINY_DIR when set)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach the hub fails loudly
    cache = os.environ.get("HWGP_TINY_DIR") or tmp_path_factory.mktemp("tiny")
    return ensure_tiny_models(Path(cache))


@pytest.fixture(scope="session")
def catalog(tiny_dir) -> Catalog:
    return Catalog.load(tiny_dir=tiny_dir.parent)


@pytest.fixture(scope="session")
def engine(catalog) -> Engine:
    """One CPU engine shared by the tests that don't count loads."""
    return Engine(device="cpu", catalog=catalog, default_models=TINY_DEFAULTS, lora_dirs=[])


@pytest.fixture
def fresh_engine(catalog) -> Engine:
    """An engine with nothing loaded, for tests that count loads."""
    return Engine(device="cpu", catalog=catalog, default_models=TINY_DEFAULTS, lora_dirs=[])
