"""Shared fixtures: the published DSv4-Flash layout as a sparse artifact, and a Hypothesis profile."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from vllm_deepseek_v4.devtools import flash

sys.path.insert(0, str(Path(__file__).parent))          # tests/tiny.py, tests/vllm_support.py

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def flash_dir(tmp_path_factory) -> Path:
    """The published DSv4-Flash layout (69,187 tensors): real headers, zero-filled holes, ~13 MB on disk."""
    d = tmp_path_factory.mktemp("flash")
    flash.materialise(d)
    return d
