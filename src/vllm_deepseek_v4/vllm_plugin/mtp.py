"""``DeepSeekV4MTPModel`` for vLLM's ``method="mtp"`` proposer: our portable MTP block(s) as the draft.

- Schemes: detected from the checkpoint for the draft's *own* modules (the plan's ``mtp.K`` report), never
  taken from ``vllm_config.quant_config`` -- that is the target's object (the proposer copies the target's
  config, and ``vllm.config.replace`` would even rebuild it), and it is never mutated here.
- Inputs/outputs: ``forward`` takes the target's pre-``hc_head`` streams ``[T, hc_mult * D]`` and the next
  tokens and returns the block's streams ``[T, hc_mult * D]`` (vLLM feeds them back for deeper drafts);
  ``compute_logits`` collapses them with the block's own ``hc_head`` + ``norm`` and applies the shared head.
- Shared ``embed``/``head``: loaded here from the checkpoint too (so PP > 1 or a proposer that does not share
  still works) and exposed as ``model.embed_tokens`` / ``model.layers[str(L + k)].shared_head.head`` /
  ``lm_head``, the names vLLM's proposer replaces with the target's. Before the first draft step the tensors
  actually in use are checked, parameter by parameter, against the checkpoint's (a digest taken at load).
- Caches: one sliding-window cache per MTP layer (all draft layers must share one KV-cache group).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import AliasMismatchError, MTPLayoutError
from ..kernels import dispatch
from ..loader.load import schemes_from_plan
from ..loader.plan import build_plan
from ..model import resolve_schemes
from ..model.linear import QLinear
from ..model.mtp import MTPBlock
from ..model.parallel import global_expert_names
from ..model.primitives import Embedding
from .dummy import materialize_if_dummy
from .kv import PagedKV, StepInputs
from .model import check_supported, model_path, parallel_context
from .weights import PlanRouter, assign, check_filled

__all__ = ["DSV4MTPDraft"]

logger = logging.getLogger(__name__)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


class SharedHead(nn.Module):
    """``layers[str(L + k)].shared_head.head``: where vLLM's proposer plugs in the target's ``lm_head``."""

    def __init__(self, head: QLinear) -> None:
        super().__init__()
        self.head = head


class MTPLayer(nn.Module):
    def __init__(self, block: MTPBlock, head: QLinear) -> None:
        super().__init__()
        self.block = block
        self.shared_head = SharedHead(head)


class DraftModel(nn.Module):
    def __init__(self, embed: Embedding, layers: dict[str, MTPLayer]) -> None:
        super().__init__()
        self.embed_tokens = embed
        self.layers = nn.ModuleDict(layers)


class DSV4MTPDraft(nn.Module):
    def __init__(self, *, vllm_config: object, prefix: str = "") -> None:
        super().__init__()
        check_supported(vllm_config)
        draft_config = vllm_config.speculative_config.draft_model_config  # type: ignore[attr-defined]
        self.plan = build_plan(model_path(draft_config), include_mtp=True)
        report = self.plan.mtp_report()
        if not report["complete"]:
            problems = self.plan.mtp_problems() or self.plan.problems()
            raise MTPLayoutError(file=self.plan.path, tensor="mtp.*",
                                 hint="speculative decoding with method=mtp needs the checkpoint's MTP block: "
                                      + "; ".join(problems[:6]) + " (without --speculative-config the target "
                                      "serves alone)")
        self.plan.raise_if_bad()
        cfg = self.cfg = self.plan.cfg
        L, N, D = cfg.n_layers, cfg.hc_mult, cfg.dim
        if cfg.ratio(L) > 0:
            raise NotImplementedError(f"DSv4 plugin: mtp.0 has compress ratio {cfg.ratio(L)}; vLLM keeps all draft "
                                      "attention caches in one KV-cache group, so the draft must be sliding-only")
        self.dtype: torch.dtype = draft_config.dtype
        detected = schemes_from_plan(self.plan)
        full = resolve_schemes(cfg, {k: v for k, v in detected.items() if k.startswith("mtp.")})
        self.schemes = {f"mtp.{k}": full[f"mtp.{k}"] for k in range(cfg.n_mtp_layers)}
        self.par = par = parallel_context(vllm_config)            # sharded like the target (vocab-parallel too)
        par.check(cfg)
        with torch.device("meta"):
            head = QLinear(D, len(par.vocab(cfg)), "bf16", dtype=self.dtype)
            blocks = [MTPBlock(cfg, k, self.schemes[f"mtp.{k}"], dtype=self.dtype, parallel=par)
                      for k in range(cfg.n_mtp_layers)]
            self.model = DraftModel(Embedding(cfg.vocab_size, D, dtype=self.dtype, parallel=par),
                                    {str(L + k): MTPLayer(b, head) for k, b in enumerate(blocks)})
        self.lm_head = head
        self.step = StepInputs()
        block_size = vllm_config.cache_config.block_size  # type: ignore[attr-defined]
        # vLLM never passes the draft step index, so only mtp.0 drafts (every step); deeper blocks are loaded
        # (strict accounting) but get no cache and never run.
        if cfg.n_mtp_layers > 1:
            logger.warning("DSv4 plugin: %d MTP layers in %s; vLLM drafts every step with mtp.0 only",
                           cfg.n_mtp_layers, self.plan.path)
        self.kv = nn.ModuleList([PagedKV(cfg, cfg.ratio(L), f"{prefix}mtp.0.attn", self.step, block_size)])
        self._router = PlanRouter(self.plan, wanted=lambda key: key.startswith(("mtp.", "head.", "embed.")),
                                  parallel=par)
        self._checkpoint_digests: dict[str, str] = {}
        self._shared_checked = False
        if materialize_if_dummy(vllm_config, self, self._canonical_modules(), self._router, self.dtype, "MTP draft",
                                draft=True):   # load_weights never runs; shared embed/head checked against the fill
            self._take_digests()

    def _layer(self) -> MTPLayer:
        """``mtp.0``: the block that drafts (vLLM passes no step index)."""
        layer = self.model.layers[str(self.cfg.n_layers)]
        assert isinstance(layer, MTPLayer)
        return layer

    # ---- vLLM model interface ----
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, spec_step_idx: int = 0,
                **kwargs: object) -> torch.Tensor:
        if not self._shared_checked:
            self.verify_shared()
        cfg = self.cfg
        T = hidden_states.shape[0]
        X = hidden_states.view(1, T, cfg.hc_mult, cfg.dim)
        e = self.model.embed_tokens(input_ids[None]) if inputs_embeds is None else inputs_embeds[None]
        self.step.begin(positions)
        Z = self._layer().block(X, e, input_ids[None], 0, self.kv[0])
        return Z[0].flatten(1)

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor:
        layer, cfg = self._layer(), self.cfg
        y = layer.block.head_input(hidden_states.view(1, -1, cfg.hc_mult, cfg.dim))[0]
        return self.par.gather(dispatch.linear(y.float(), layer.shared_head.head))

    # ---- weights ----
    def is_unused_checkpoint_weight(self, name: str) -> bool:
        """The trunk's tensors; never ``head``/``embed`` (or their copies): the draft needs them."""
        return name not in self._router.targets

    def _canonical_modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"embed": self.model.embed_tokens, "head": self._layer().shared_head.head}
        for key, layer in self.model.layers.items():
            k = int(key) - self.cfg.n_layers
            for name, m in layer.block.named_modules():
                out[f"mtp.{k}" + (f".{name}" if name else "")] = m
        return global_expert_names(out, self.par.experts(self.cfg).start)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        modules = self._canonical_modules()
        for key, t in self._router.route(weights):
            assign(modules, key, t, self.dtype, self.plan.path)
        self._router.finish()
        check_filled(self, self.plan.path, "MTP draft")
        self._take_digests()
        return {n for n, _ in self.named_parameters()}

    def _take_digests(self) -> None:
        self._checkpoint_digests = {"embed.weight": _digest(self.model.embed_tokens.weight),
                                    "head.weight": _digest(self._layer().shared_head.head.weight)}

    def verify_shared(self) -> None:
        """The embedding and head the draft computes with (its own, or the target's after vLLM's sharing)
        must equal the checkpoint's, parameter by parameter."""
        if not self._checkpoint_digests:
            raise AliasMismatchError(file=self.plan.path, tensor="embed/head",
                                     hint="the MTP draft was not loaded through load_weights")
        in_use = {"embed.weight": self.model.embed_tokens.weight}
        for key, layer in self.model.layers.items():
            in_use[f"layers.{key}.shared_head.head.weight"] = layer.shared_head.head.weight
        for name, t in in_use.items():
            want = self._checkpoint_digests["embed.weight" if name.startswith("embed") else "head.weight"]
            if _digest(t) != want:
                raise AliasMismatchError(file=self.plan.path, tensor=f"draft {name}",
                                         expected="the checkpoint's values", found="different values",
                                         hint="the embedding/head shared into the MTP draft is not the one in "
                                              "this artifact")
        self._shared_checked = True
