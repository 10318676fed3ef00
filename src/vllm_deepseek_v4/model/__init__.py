"""Portable DSv4 model in PyTorch (main stack + MTP), named in the upstream checkpoint's vocabulary.

Top-down: ``model.py`` (schemes, state, model) -> ``block.py`` / ``mtp.py`` -> ``attention.py``,
``compressor.py``, ``moe.py``, ``hyper.py`` -> ``primitives.py``, ``linear.py``. Compute-heavy ops go
through ``vllm_deepseek_v4.kernels.dispatch``.
"""
from __future__ import annotations

from .block import GROUPS
from .init import init_random_
from .kv_store import AttnCache, KVStore
from .linear import QLinear, role_layout
from .model import DSV4Model, ModelState, Schemes, build_model, resolve_schemes

__all__ = ["DSV4Model", "ModelState", "AttnCache", "KVStore", "Schemes", "GROUPS", "QLinear",
           "role_layout", "build_model", "resolve_schemes", "init_random_"]
