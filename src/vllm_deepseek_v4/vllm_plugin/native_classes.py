"""vLLM's own DeepSeek-V4 classes, loaded through our plan: what the plugin registers under the ``native`` engine.

Subclasses of the platform's ``DeepseekV4ForCausalLM`` / ``DeepSeekV4MTP`` (``vllm.models.deepseek_v4``'s
``amd`` classes on ROCm, the ``nvidia`` ones otherwise). Nothing of the forward path is overridden: only

- ``load_weights``: every tensor routed by the load plan (``native.glue.load_weights_from_plan``) of the
  artifact directory (a hub id resolved to vLLM's HF-cache snapshot; unresolvable: refused, never vLLM's stock
  mapping, which has the bugs the plan fixes); vLLM's stock mapping only with ``VLLM_DSV4_STOCK_LOADER=1``;
- the draft's ``__init__``: built with its own quant config from the draft's tensors
  (``native.glue.mtp_quant_config``), not the target's object;
- the target's ``__init__``: the plan's quant config where vLLM's is compressed-tensors (whose checkpoint-name
  targets never match vLLM's modules: ``native.glue.target_quant_config``);
- both ``__init__``s: modules whose format vLLM's DSv4 forward has no kernel for (an NVFP4 ``wo_a``) get our
  quant method (``native.glue.install_own_kernels``: our Triton decode at load, vLLM's own matmul after).
"""
from __future__ import annotations

import importlib
from typing import Any, Iterable

from ..native import glue

__all__ = ["NativeDeepseekV4ForCausalLM", "NativeDeepSeekV4MTP", "BASE_PACKAGE"]


def _base_package() -> str:
    from vllm.platforms import current_platform

    return "vllm.models.deepseek_v4." + ("amd" if current_platform.is_rocm() else "nvidia")


BASE_PACKAGE = _base_package()
_Target = importlib.import_module(BASE_PACKAGE + ".model").DeepseekV4ForCausalLM
_Draft = importlib.import_module(BASE_PACKAGE + ".mtp").DeepSeekV4MTP
# the nvidia target runs process_weights_after_loading inside load_weights; amd does not
_TARGET_POST = BASE_PACKAGE.endswith("nvidia")


class NativeDeepseekV4ForCausalLM(_Target):  # type: ignore[misc, valid-type]
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        qc = glue.target_quant_config(vllm_config, vllm_config.quant_config)
        super().__init__(vllm_config=glue.with_quant_config(vllm_config, qc), prefix=prefix)
        self.dsv4_own_kernels = glue.install_own_kernels(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        loaded = glue.load_weights_from_plan(self, "target", weights, glue.model_path(self.config))
        if loaded is None:
            return super().load_weights(weights)
        if _TARGET_POST:
            self.process_weights_after_loading()
        return loaded


class NativeDeepSeekV4MTP(_Draft):  # type: ignore[misc, valid-type]
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        qc = glue.mtp_quant_config(vllm_config, vllm_config.quant_config)
        super().__init__(vllm_config=glue.with_quant_config(vllm_config, qc), prefix=prefix)
        self.dsv4_own_kernels = glue.install_own_kernels(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        loaded = glue.load_weights_from_plan(self, "mtp", weights, glue.model_path(self.config))
        if loaded is None:
            return super().load_weights(weights)
        self.process_weights_after_loading()
        return loaded
