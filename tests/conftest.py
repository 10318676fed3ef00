"""Shared fixtures: the published DSv4-Flash layout as a sparse artifact, and a Hypothesis profile."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))          # tests/artifacts.py, tests/tiny.py

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

SHARED = Path(__file__).resolve().parents[2] / "shared"
INVENTORY = SHARED / "tools" / "dsv4_inventory.py"


def load_inventory_module():
    if not INVENTORY.exists():
        pytest.skip(f"{INVENTORY} not found: the shared tools sit beside the repo checkout")
    spec = importlib.util.spec_from_file_location("dsv4_inventory", INVENTORY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DT.setdefault("u8", ("U8", 1))                   # for derived NVFP4 variants
    mod.DT.setdefault("i32", ("I32", 4))
    return mod


@pytest.fixture(scope="session")
def inventory():
    return load_inventory_module()


@pytest.fixture(scope="session")
def flash_dir(tmp_path_factory, inventory) -> Path:
    d = tmp_path_factory.mktemp("flash")
    inventory.materialise("flash", str(d))
    return d
