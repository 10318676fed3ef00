"""``DeepseekV4ForCausalLM`` for vLLM: our portable DSv4 trunk, paged caches, weights through our load plan.

- Construction: the plan is built from the safetensors headers at the model path (``include_mtp=False``:
  the draft loads ``mtp.*`` itself), the trunk is the portable ``DSV4Model`` built on the meta device with
  the schemes detected for the trunk's own modules. vLLM's ``quant_config`` is never consulted: quantised
  linears keep their on-disk formats and compute through ``kernels.dispatch`` (dequantise in torch on CPU).
- Forward: all scheduled tokens run as one ``[1, T]`` sequence through the portable blocks; each attention
  layer's KV store is its :class:`~.kv.PagedKV`, which locates the requests in the batch and keeps every
  state in vLLM's caches (the attention math is the portable module's). ``forward`` returns the collapsed
  ``[T, D]`` state for ``compute_logits``; the pre-``hc_head`` streams ``[T, hc_mult * D]`` are kept for the
  MTP proposer (``get_mtp_target_hidden_states``).
- ``load_weights`` routes vLLM's ``(name, tensor)`` stream through the plan and fails if anything is
  left unfilled or unexplained.
- Tensor / expert parallel (``--tensor-parallel-size``, ``--enable-expert-parallel``): each rank builds its
  shard (``model.parallel``: local heads, groups, index heads, intermediate, vocab rows, experts) and reads
  only its slices (``loader.sharding.rank_reads`` through the router); the collectives are vLLM's TP group's.
  ``compute_logits`` returns the whole vocab on every rank (the head's slices are all-gathered).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..config import DSV4Config
from ..loader.load import schemes_from_plan
from ..loader.plan import build_plan
from ..model import DSV4Model, ModelState
from ..model.parallel import SINGLE, Parallel
from ..native.paths import model_source, resolve_model_dir
from .dummy import materialize_if_dummy
from .kv import PagedKV, StepInputs
from .weights import PlanRouter, assign, check_filled

logger = logging.getLogger(__name__)

__all__ = ["DSV4ForCausalLM", "model_path", "parallel_context", "rank_report"]


def model_path(model_config: object) -> str:
    """The local artifact directory: the plan reads the safetensors headers before vLLM loads weights, so a
    hub id is resolved to its HF-cache snapshot first (one implementation: ``native.paths``)."""
    return resolve_model_dir(*model_source(model_config))


def check_supported(vllm_config: object) -> None:
    """Refuse what the plugin would otherwise silently ignore."""
    from .options import check_options
    from .quant import QUANT_NAME

    check_options(vllm_config)                                  # the engine-option table (options.py)

    pp = vllm_config.parallel_config.pipeline_parallel_size  # type: ignore[attr-defined]
    if pp != 1:
        raise NotImplementedError(f"DSv4 plugin: pipeline_parallel_size={pp} is not supported (use 1)")
    qc = vllm_config.quant_config  # type: ignore[attr-defined]
    if qc is not None and qc.get_name() != QUANT_NAME:
        raise NotImplementedError(f"DSv4 plugin: vLLM quantization {qc.get_name()!r} (--quantization) is not "
                                  "supported; every module computes in the format its checkpoint tensors are "
                                  "stored in (detected from the safetensors headers)")


def warn_prefix_granularity(vllm_config: object, cfg: DSV4Config) -> None:
    """Prefix caching is honoured, but a hit lands on a multiple of the layout's block sizes' lcm (12,288 tokens
    at DSv4-Flash): say so once at startup rather than let a user wonder why shorter shared prefixes never hit."""
    if not vllm_config.cache_config.enable_prefix_caching:  # type: ignore[attr-defined]
        return
    from .kv_layout import block_sizes, prefix_hit_tokens

    logger.warning("DSv4 plugin: prefix caching is on; with this model's KV layout (block sizes %s tokens) a "
                   "cached prefix is reused only in multiples of %d tokens, shorter shared prefixes are recomputed "
                   "(docs/vllm-plugin.md, Caches)", block_sizes(cfg), prefix_hit_tokens(cfg))


def parallel_context(vllm_config: object) -> Parallel:
    """This rank's place in vLLM's TP group and vLLM's collectives over it (EP runs over the same group)."""
    pc = vllm_config.parallel_config  # type: ignore[attr-defined]
    if pc.data_parallel_size != 1:
        raise NotImplementedError(f"DSv4 plugin: data_parallel_size={pc.data_parallel_size} is not supported "
                                  "(experts are split over the TP group only)")
    tp = pc.tensor_parallel_size
    if tp == 1:
        return SINGLE
    from vllm.distributed import (get_tensor_model_parallel_rank, tensor_model_parallel_all_gather,
                                  tensor_model_parallel_all_reduce)

    rank, ep = get_tensor_model_parallel_rank(), bool(pc.enable_expert_parallel)
    return Parallel(tp_rank=rank, tp_size=tp, ep_rank=rank if ep else 0, ep_size=tp if ep else 1,
                    all_reduce=lambda t: tensor_model_parallel_all_reduce(t.contiguous()),
                    all_gather=lambda t: tensor_model_parallel_all_gather(t.contiguous(), dim=-1))


def rank_report(worker: object) -> dict[str, int]:
    """Run in each vLLM worker (``llm.collective_rpc(rank_report)``): this rank's place and the bytes of every
    distinct parameter and buffer its target and draft hold (shared embed/head counted once)."""
    runner = worker.model_runner  # type: ignore[attr-defined]
    modules = [runner.model.model] + ([runner.drafter.model.model] if getattr(runner, "drafter", None) else [])
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
    par = runner.model.par
    return {"tp_rank": par.tp_rank, "tp_size": par.tp_size, "ep_size": par.ep_size, "bytes": total}


class DSV4ForCausalLM(nn.Module):
    """Target model. Exposes ``model.embed_tokens`` and ``lm_head`` under vLLM's names so the MTP proposer
    shares them with the draft."""

    def __init__(self, *, vllm_config: object, prefix: str = "") -> None:
        super().__init__()
        check_supported(vllm_config)
        mc = vllm_config.model_config  # type: ignore[attr-defined]
        self.plan = build_plan(model_path(mc), include_mtp=False)
        self.plan.raise_if_bad()
        full = self.plan.cfg
        self.cfg = full.without_mtp()
        self.dtype: torch.dtype = mc.dtype
        self.schemes = schemes_from_plan(self.plan).get("main", {})
        self.par = parallel_context(vllm_config)
        with torch.device("meta"):
            self.model = DSV4Model(self.cfg, schemes={"main": self.schemes}, dtype=self.dtype, parallel=self.par)
        self.model.embed_tokens = self.model.embed          # vLLM's names for the proposer's sharing
        self.lm_head = self.model.head
        self.step = StepInputs()
        block_size = vllm_config.cache_config.block_size  # type: ignore[attr-defined]
        self.kv = nn.ModuleList(PagedKV(full, full.ratio(i), f"{prefix}layers.{i}.attn", self.step, block_size)
                                for i in range(full.n_layers))
        self._state = ModelState(list(self.kv))
        warn_prefix_granularity(vllm_config, full)
        self._keep_streams = vllm_config.speculative_config is not None  # type: ignore[attr-defined]
        self._streams: torch.Tensor | None = None
        self._router = PlanRouter(self.plan, wanted=lambda key: not key.startswith("mtp."), parallel=self.par)
        materialize_if_dummy(vllm_config, self.model, self.model.canonical_modules(), self._router, self.dtype,
                             "trunk")                  # load_format=dummy never calls load_weights

    # ---- vLLM model interface ----
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: object = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("DSv4 plugin: inputs_embeds without input_ids (hash routing needs the ids)")
        self.step.begin(positions)
        self._state.pos = 0                                    # positions come from vLLM, per token
        X = self.model.streams(input_ids[None], self._state)   # [1, T, N, D]
        self._streams = X[0].flatten(1) if self._keep_streams else None
        return self.model.head_input(X)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden_states)

    def get_mtp_target_hidden_states(self) -> torch.Tensor | None:
        """The pre-``hc_head`` streams of the last forward, ``[T, hc_mult * D]`` (the MTP draft's input)."""
        return self._streams

    # ---- weights ----
    def is_unused_checkpoint_weight(self, name: str) -> bool:
        """On-disk tensors the trunk never reads (``mtp.*`` except copies of the shared embed/head)."""
        return name not in self._router.targets

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        modules = self.model.canonical_modules()
        for key, t in self._router.route(weights):
            assign(modules, key, t, self.dtype, self.plan.path)
        self._router.finish()
        check_filled(self.model, self.plan.path, "trunk")
        return {f"model.{n}" for n, _ in self.model.named_parameters()}
