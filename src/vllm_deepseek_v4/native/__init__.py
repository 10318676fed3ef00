"""Native loading for vLLM's *own* DeepSeek-V4 classes (``DeepseekV4ForCausalLM``, ``DeepSeekV4MTP``).

GPU users run vLLM's classes, not our portable model; this package loads those classes from our load plan
(rule tables in ``tables.py``), gives the MTP draft its own quant config from the schemes detected on disk
(``quant_config.py``), and compares with what vLLM's unmodified loader does (``stock.py``). ``dsv4
check-vllm`` is the command line. Design: ``docs/native.md``.

Importing this package imports neither torch nor vLLM; the entry points import them when called.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_native", "check_vllm", "vllm_missing"]


def load_native(path: str, **kwargs: Any) -> Any:
    """See :func:`vllm_deepseek_v4.native.session.load_native`."""
    from .session import load_native as _load

    return _load(path, **kwargs)


def check_vllm(path: str, **kwargs: Any) -> dict[str, Any]:
    """See :func:`vllm_deepseek_v4.native.check.check_vllm`."""
    from .check import check_vllm as _check

    return _check(path, **kwargs)


def vllm_missing() -> str | None:
    """None when vLLM's DeepSeek-V4 classes are importable, else how to install vLLM."""
    from .build import vllm_missing as _missing

    return _missing()
