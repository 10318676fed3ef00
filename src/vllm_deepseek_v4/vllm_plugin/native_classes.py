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


class _PlanLoaded:
    """What the two registered classes add to vLLM's, with their differences as data: ``_dsv4_kind`` (the plan's
    half: ``target`` / ``mtp``), ``_dsv4_quant_config`` (the ``native.glue`` function that picks the quant
    config the class is built with) and ``_dsv4_post_load`` (whether ``process_weights_after_loading`` runs here
    after the plan's load: vLLM's base ``load_weights`` would have run it, which the plan's replaces)."""

    _dsv4_kind: str
    _dsv4_quant_config: Any
    _dsv4_post_load: bool

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        qc = self._dsv4_quant_config(vllm_config, vllm_config.quant_config)
        super().__init__(vllm_config=glue.with_quant_config(vllm_config, qc), prefix=prefix)  # type: ignore[call-arg]
        self.dsv4_own_kernels = glue.install_own_kernels(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        loaded = glue.load_weights_from_plan(self, self._dsv4_kind, weights, glue.model_path(self.config))
        if loaded is None:
            return super().load_weights(weights)  # type: ignore[misc]
        if self._dsv4_post_load:
            self.process_weights_after_loading()
        return loaded


class NativeDeepseekV4ForCausalLM(_PlanLoaded, _Target):  # type: ignore[misc, valid-type]
    _dsv4_kind = "target"
    _dsv4_quant_config = staticmethod(glue.target_quant_config)
    _dsv4_post_load = _TARGET_POST


class NativeDeepSeekV4MTP(_PlanLoaded, _Draft):  # type: ignore[misc, valid-type]
    _dsv4_kind = "mtp"
    _dsv4_quant_config = staticmethod(glue.mtp_quant_config)
    _dsv4_post_load = True
