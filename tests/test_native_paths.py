"""Where vLLM's DeepSeek-V4 model is on disk (``native.paths``): a local directory as is, a hub id resolved to
its Hugging Face cache snapshot (what vLLM's loader downloads into), anything else refused -- never vLLM's
stock loader as a fallback. The registered native classes load a hub id from a fake, offline HF cache."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_deepseek_v4.native import glue
from vllm_deepseek_v4.native.paths import ModelPathError, model_source, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "dsv4-test/geo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, files: dict[str, bytes], repo_id: str = REPO_ID) -> Path:
    """An HF hub cache holding ``repo_id`` at ``main`` (``refs/main`` -> one snapshot): the layout
    ``huggingface_hub`` writes and reads offline. Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)        # read at import; snapshot_download reads these
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("VLLM_DSV4_STOCK_LOADER", raising=False)
    return cache


def test_local_directory_is_itself(tmp_path: Path) -> None:
    assert resolve_model_dir(str(tmp_path)) == str(tmp_path)


def test_hub_id_resolves_to_the_cache_snapshot(offline_cache: Path) -> None:
    snap = fake_hub_cache(offline_cache, {"config.json": b"{}", "model.safetensors": b"\0" * 8})
    assert resolve_model_dir(REPO_ID) == str(snap)
    # the glue's entry (both the native classes and the upstream branch call it) from each config shape vLLM has
    mc = SimpleNamespace(model=REPO_ID, revision=None, hf_config=SimpleNamespace(_name_or_path=REPO_ID))
    vc = SimpleNamespace(model_config=mc, load_config=SimpleNamespace(download_dir=None, ignore_patterns=None),
                         speculative_config=None)
    for obj in (vc, mc, mc.hf_config):
        assert glue.model_path(obj) == str(snap), obj
    # the portable engine's helper is the same implementation
    pytest.importorskip("torch")
    from vllm_deepseek_v4.vllm_plugin.model import model_path

    assert model_path(mc) == str(snap)


def test_download_dir_and_revision_are_vllms(offline_cache: Path, tmp_path: Path) -> None:
    mc = SimpleNamespace(model=REPO_ID, revision="v1")
    vc = SimpleNamespace(model_config=mc, load_config=SimpleNamespace(download_dir=str(tmp_path / "dl"),
                                                                      ignore_patterns=["original/*"]))
    assert model_source(vc) == (REPO_ID, "v1", str(tmp_path / "dl"), ["original/*"])
    with pytest.raises(ModelPathError, match=r"revision v1, cache .*dl"):
        glue.model_path(vc)


def test_unresolvable_hub_id_is_refused_not_fallen_back(offline_cache: Path) -> None:
    mc = SimpleNamespace(model="nobody/not-cached", revision=None)
    vc = SimpleNamespace(model_config=mc, load_config=None, speculative_config=None, quant_config="vllm's")
    with pytest.raises(ModelPathError, match=r"'nobody/not-cached' is not a local directory .*offline=True"):
        glue.mtp_quant_config(vc, vc.quant_config)
    with pytest.raises(ModelPathError, match="nobody/not-cached"):
        glue.load_weights_from_plan(object(), "target", iter(()), glue.model_path(mc))


def test_snapshot_without_safetensors_is_refused(offline_cache: Path) -> None:
    fake_hub_cache(offline_cache, {"config.json": b"{}"})
    with pytest.raises(ModelPathError, match=r"holds no \*\.safetensors"):
        resolve_model_dir(REPO_ID)


def test_stock_loader_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_DSV4_STOCK_LOADER", raising=False)
    with pytest.raises(ModelPathError, match="VLLM_DSV4_STOCK_LOADER"):
        glue.plan_for("")
    monkeypatch.setenv("VLLM_DSV4_STOCK_LOADER", "1")
    assert glue.plan_for("") is None
    assert glue.mtp_quant_config(SimpleNamespace(), "vllm's") == "vllm's"


_HUB_LOAD = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from vllm.config import LoadConfig, set_current_vllm_config
from vllm.model_executor.model_loader import get_model_loader
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm_deepseek_v4.native.build import ensure_distributed, make_vllm_config
from vllm_deepseek_v4.native.standins import cpu_standins
from vllm_deepseek_v4.vllm_plugin import native_classes as nc

out = {}
with cpu_standins():
    vc = make_vllm_config(sys.argv[1], native=False)
    ensure_distributed(vc)
    loader = get_model_loader(LoadConfig())                  # vLLM's own loader: it resolves the hub id too
    for kind, cls, mc in (("target", nc.NativeDeepseekV4ForCausalLM, vc.model_config),
                          ("mtp", nc.NativeDeepSeekV4MTP, vc.speculative_config.draft_model_config)):
        with set_default_torch_dtype(mc.dtype), torch.device("cpu"):
            model = initialize_model(vc, model_class=cls, model_config=mc)
        with set_current_vllm_config(vc):                    # as vLLM's worker runs the loader
            loader.load_weights(model, mc)
        methods = sorted({type(getattr(m, "quant_method", None)).__name__ for _, m in model.named_modules()
                          if getattr(m, "quant_method", None) is not None})
        out[kind] = {"name_or_path": model.config._name_or_path, "methods": methods}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_native_classes_load_a_hub_id_through_the_plan(tmp_path: Path) -> None:
    """``vllm serve dsv4-test/geo`` with the model in the HF cache (offline): the registered native classes
    resolve the cache snapshot, plan it and load every parameter; the plan's log lines prove the route."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts/vllm_geometry_model.py"), str(tmp_path / "geo")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    fake_hub_cache(tmp_path / "hub", {p.name: p.read_bytes() for p in (tmp_path / "geo").iterdir()})
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"), VLLM_PLUGINS="",
               OMP_NUM_THREADS="1")
    env.pop("VLLM_DSV4_STOCK_LOADER", None)
    r = subprocess.run([sys.executable, "-c", _HUB_LOAD, REPO_ID], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert doc["target"]["name_or_path"] == REPO_ID                      # not a local directory
    for kind in ("target", "mtp"):
        assert f"DeepSeek-V4 {kind} loaded through the load plan" in r.stderr, r.stderr[-3000:]
    assert "own quant config none" in r.stderr                           # BF16 draft: decided from its tensors
    assert "UnquantizedFusedMoEMethod" in doc["mtp"]["methods"]
    assert all(m.startswith("Unquantized") for m in doc["mtp"]["methods"]), doc["mtp"]
