"""A vLLM quantization config that claims DSv4 checkpoints so vLLM's own formats never get in the way.

Without it, a ``quantization_config`` in ``config.json`` makes vLLM build its own config object before the
model exists (``fp8`` -> ``Fp8Config`` or ``deepseek_v4_fp8``, ``compressed-tensors`` ->
``CompressedTensorsConfig``, ``modelopt_fp4`` ...), check it against the platform (CPU lists only a few
methods) and hand it to our constructors. Our modules never use it: every linear keeps the on-disk format
*detected from the safetensors headers*, per module (trunk and MTP separately), and computes through
``kernels.dispatch``. So we register a pass-through config whose ``override_quantization_method`` claims
every DSv4 target/draft config (custom configs are probed before the built-in ones); vLLM then records
this name, and ``get_quant_method`` returns ``None`` for every layer.

The claim is process-wide once registered, but vLLM's *own* DSv4 classes need vLLM's own configs (a
``None`` quant method makes their linears refuse to build). Code that builds those classes in a process where
the portable engine registered this config (``dsv4 check-vllm``'s stock baseline, the native builders, the
test suite running both engines in one process) derives its configs inside ``vllm_own_formats()``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["QUANT_NAME", "register_quant_config", "vllm_own_formats"]

QUANT_NAME = "dsv4_plugin"
_suspended = 0          # > 0 inside vllm_own_formats(): the pass-through claims nothing
_MODEL_TYPES = ("deepseek_v4",)
_ARCHS = ("DeepseekV4ForCausalLM", "DeepSeekV4MTPModel")


def _is_dsv4(hf_config: Any) -> bool:
    if hf_config is None:
        return False
    archs = set(getattr(hf_config, "architectures", None) or [])
    return getattr(hf_config, "model_type", None) in _MODEL_TYPES or bool(archs & set(_ARCHS))


@contextlib.contextmanager
def vllm_own_formats() -> Iterator[None]:
    """vLLM configs created inside derive vLLM's own quant config from ``quantization_config``, as stock vLLM
    does, even where the pass-through is registered (nestable; not thread-scoped: configs are built on one
    thread)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def register_quant_config() -> None:
    if "DSV4PluginQuantConfig" in globals():          # already registered in this process (see __getattr__)
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class DSV4PluginQuantConfig(QuantizationConfig):
        """Records the checkpoint's ``quantization_config``; builds nothing (see the module docstring)."""

        def __init__(self, raw: dict[str, Any] | None = None) -> None:
            super().__init__()
            self.raw = dict(raw or {})

        def get_name(self) -> str:  # type: ignore[override]
            return QUANT_NAME

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            return [torch.float32, torch.bfloat16, torch.float16]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> DSV4PluginQuantConfig:
            return cls(config)

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                         hf_config: Any = None) -> str | None:
            if _suspended:
                return None
            return QUANT_NAME if (_is_dsv4(hf_config) or user_quant == QUANT_NAME) else None

        def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> None:
            return None

    # Picklable by name (TP > 1 spawns workers with the vllm_config, quant config included): see __getattr__.
    DSV4PluginQuantConfig.__qualname__ = DSV4PluginQuantConfig.__name__
    globals()[DSV4PluginQuantConfig.__name__] = DSV4PluginQuantConfig
    register_quantization_config(QUANT_NAME)(DSV4PluginQuantConfig)


def __getattr__(name: str) -> Any:
    """A spawned TP worker unpickles ``quant.DSV4PluginQuantConfig`` before vLLM loads plugins: register first."""
    if name == "DSV4PluginQuantConfig":
        register_quant_config()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
