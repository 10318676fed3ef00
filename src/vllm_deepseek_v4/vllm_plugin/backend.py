"""A pure-torch attention *backend descriptor* for our cache layers: spec-driven allocation, our metadata.

vLLM never runs an ``AttentionImpl`` for these layers (the attention math is ``kv.PagedKV`` calling our
portable modules); the backend only names the metadata builder, which hands each cache layer its KV-cache
group's per-token ``slot_mapping`` and per-request ``block_table`` plus the request boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)

__all__ = ["DSV4CacheBackend", "DSV4CacheMetadata", "DSV4CacheMetadataBuilder"]


@dataclass
class DSV4CacheMetadata:
    num_reqs: int
    num_actual_tokens: int
    query_start_loc: torch.Tensor       # [num_reqs + 1] on the host: request i owns tokens [q[i], q[i+1])
    slot_mapping: torch.Tensor          # [num_tokens] block * block_size + offset of each token (-1: padding)
    block_table: torch.Tensor           # [num_reqs, max_blocks] this group's blocks of each request


class DSV4CacheMetadataBuilder(AttentionMetadataBuilder[DSV4CacheMetadata]):
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: object, layer_names: list[str], vllm_config: object,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DSV4CacheMetadata:
        cm = common_attn_metadata
        return DSV4CacheMetadata(num_reqs=cm.num_reqs, num_actual_tokens=cm.num_actual_tokens,
                                 query_start_loc=cm.query_start_loc_cpu[: cm.num_reqs + 1],
                                 slot_mapping=cm.slot_mapping, block_table=cm.block_table_tensor)


class DSV4CacheBackend(AttentionBackend):
    supported_dtypes = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes = ["auto", "float32", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return "DSV4_TORCH_PAGED"

    @staticmethod
    def get_impl_cls() -> type:
        raise NotImplementedError("DSv4 cache layers compute attention in vllm_plugin.kv, not in an AttentionImpl")

    @staticmethod
    def get_builder_cls() -> type[DSV4CacheMetadataBuilder]:
        return DSV4CacheMetadataBuilder
