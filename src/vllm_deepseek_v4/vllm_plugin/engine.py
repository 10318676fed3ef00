"""Which engine serves DeepSeek-V4 in this process: vLLM's own classes loaded natively, or our portable model.

- ``native`` (CUDA / ROCm): subclasses of vLLM's own ``DeepseekV4ForCausalLM`` / ``DeepSeekV4MTP``
  (``native_classes.py``): vLLM's attention, MoE kernels, TP/EP and CUDA graphs untouched; only loading goes
  through our plan and the MTP draft gets its own quant config (``vllm_deepseek_v4.native.glue``).
- ``portable`` (CPU, anything else): our portable model and draft (``model.py``, ``mtp.py``): vLLM's own
  DeepSeek-V4 CPU path needs AMX-only ops and its CPU MTP raises ``NotImplementedError``.

``DSV4_ENGINE=native|portable`` overrides the platform's choice. ``choose_engine`` takes the platform check
as an argument so the choice is testable on any machine. Importing this module imports nothing heavy.
"""
from __future__ import annotations

import os
from typing import Callable

__all__ = ["ENGINES", "ENV", "choose_engine", "platform_name"]

ENV = "DSV4_ENGINE"
ENGINES = ("native", "portable")


def platform_name() -> str:
    """``cuda`` / ``rocm`` / ``cpu`` / ... from vLLM's current platform."""
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        return "rocm"
    if current_platform.is_cuda():
        return "cuda"
    return "cpu" if current_platform.is_cpu() else str(getattr(current_platform, "device_name", "other"))


def choose_engine(platform: Callable[[], str] | str = platform_name, env: dict[str, str] | None = None
                  ) -> tuple[str, str]:
    """``(engine, why)``; raises ``ValueError`` for an unknown ``DSV4_ENGINE``."""
    env = os.environ if env is None else env
    forced = env.get(ENV, "").strip().lower()
    plat = platform() if callable(platform) else platform
    if forced:
        if forced not in ENGINES:
            raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(ENGINES)}")
        return forced, f"{ENV}={forced} (platform {plat})"
    if plat in ("cuda", "rocm"):
        return "native", (f"platform {plat}: vLLM's own DeepSeek-V4 classes (attention, MoE, TP/EP, CUDA graphs), "
                          "loaded through the load plan, MTP draft with its own quant config")
    return "portable", (f"platform {plat}: vLLM's DeepSeek-V4 classes need a GPU here (CPU path: AMX-only ops, "
                        "no CPU MTP); our portable model serves")
