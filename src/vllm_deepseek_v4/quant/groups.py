"""Quant groups: which entry of a scheme table (``{group: scheme}``) each linear module reads.

Published artifacts quantize by module family, never per model (``docs/checkpoint-formats.md §6.8``), so the
planner reports one scheme per group and per part (trunk, each MTP layer), and the model builds every linear
of a group in that scheme. The mapping is keyed by module path below the block prefix (``layers.N.`` /
``mtp.K.``); the longest listed prefix of a path decides, so ``attn.indexer.compressor.wkv`` is
``compressor`` and ``ffn.experts.7.w2`` is ``experts``. The expected parameter space
(``loader/expected.py``) and the model constructors both look modules up here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["GROUP_OF", "GROUPS", "group_of", "scheme_of"]

GROUP_OF: Final[dict[str, str]] = {
    "attn": "attn",                                 # wq_a, wq_b, wkv, wo_a, wo_b
    "attn.compressor": "compressor",
    "attn.indexer": "indexer",                      # wq_b
    "attn.indexer.compressor": "compressor",
    # scoring projections: unquantized in every known artifact, reported apart so `indexer` stays meaningful
    "attn.indexer.weights_proj": "router",
    "ffn.gate": "router",
    "ffn.experts": "experts",
    "ffn.shared_experts": "shared_experts",
    "e_proj": "e_proj", "h_proj": "h_proj",         # MTP input projections
    "head": "head",                                 # the shared LM head (top level; always built bf16)
}
# The groups a model's scheme table holds (``model.resolve_schemes``): every group but the head's.
GROUPS: Final[tuple[str, ...]] = tuple(dict.fromkeys(g for g in GROUP_OF.values() if g != "head"))


def group_of(module: str) -> str:
    """The quant group of linear ``module`` (its path below ``layers.N.`` / ``mtp.K.``, or ``head``)."""
    key = module
    while key not in GROUP_OF:
        if "." not in key:
            raise KeyError(f"{module!r} belongs to no quant group (add its module path to GROUP_OF)")
        key = key.rsplit(".", 1)[0]
    return GROUP_OF[key]


def scheme_of(schemes: Mapping[str, str], module: str) -> str:
    """The scheme ``module`` is built in, from one part's ``{group: scheme}`` table."""
    return schemes[group_of(module)]
