"""Which engine the vLLM plugin registers: vLLM's own classes loaded natively (CUDA / ROCm) or our portable
model (CPU); ``DSV4_ENGINE`` overrides; one log line says which and why. The native subclasses are built and
loaded on CPU (``nvidia`` base, CPU stand-ins) from a vLLM-geometry artifact."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_deepseek_v4.vllm_plugin.engine import choose_engine

ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.mark.parametrize("platform,env,engine", [
    ("cuda", {}, "native"), ("rocm", {}, "native"), ("cpu", {}, "portable"), ("xpu", {}, "portable"),
    ("cpu", {"DSV4_ENGINE": "native"}, "native"), ("cuda", {"DSV4_ENGINE": "portable"}, "portable"),
    ("cuda", {"DSV4_ENGINE": " Native "}, "native"),
])
def test_choose_engine(platform: str, env: dict, engine: str) -> None:
    got, why = choose_engine(lambda: platform, env)
    assert got == engine and platform in why
    if env:
        assert "DSV4_ENGINE" in why


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="DSV4_ENGINE"):
        choose_engine("cuda", {"DSV4_ENGINE": "fast"})


_REGISTER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from vllm_deepseek_v4.vllm_plugin import register
register()
from vllm import ModelRegistry
for arch in ("DeepseekV4ForCausalLM", "DeepSeekV4MTPModel"):
    m = ModelRegistry.models[arch]
    print(arch, getattr(m, "module_name", ""), getattr(m, "class_name", ""))
"""


@needs_vllm
@pytest.mark.parametrize("engine", ["native", "portable"])
def test_register_logs_and_registers_engine(engine: str) -> None:
    env = {**os.environ, "DSV4_ENGINE": engine, "VLLM_PLUGINS": ""}
    r = subprocess.run([sys.executable, "-c", _REGISTER], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if "served by the" in x]
    assert len(lines) == 1 and f"the {engine} engine" in lines[0] and "DSV4_ENGINE" in lines[0], r.stderr[-2000:]
    module = "native_classes" if engine == "native" else None
    for line in r.stdout.strip().splitlines():
        arch, mod, cls = line.split()
        if module:
            assert mod.endswith(module) and cls.startswith("Native"), line
        else:
            assert mod.endswith((".model", ".mtp")) and not cls.startswith("Native"), line


@needs_vllm
@pytest.mark.slow
def test_native_subclasses_load_through_the_plan(tmp_path: Path) -> None:
    """The registered native classes (CPU: ``nvidia`` base) build with the draft's own quant config and load
    every parameter through the plan from vLLM's safetensors iterator."""
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts/vllm_geometry_model.py"), str(tmp_path / "geo")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
    from vllm.models.deepseek_v4.nvidia.mtp import DeepSeekV4MTP

    import vllm_support as vs
    from vllm_deepseek_v4.vllm_plugin import native_classes as nc

    assert issubclass(nc.NativeDeepseekV4ForCausalLM, DeepseekV4ForCausalLM)
    assert issubclass(nc.NativeDeepSeekV4MTP, DeepSeekV4MTP)
    _, models, loaded = vs.load_registered_native(tmp_path / "geo")
    for kind, model in models.items():
        assert loaded[kind] == {n for n, _ in model.named_parameters()}, kind
    assert torch.equal(models["mtp"].model.embed_tokens.weight, models["target"].model.embed_tokens.weight)
    assert "vllm_deepseek_v4" in type(models["mtp"]).__module__
