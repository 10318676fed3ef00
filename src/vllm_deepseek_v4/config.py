"""One DSv4 config record, read from either field-name dialect.

Dialects (``docs/dsv4-architecture.md §1``): the published HF-style ``config.json``
(``hidden_size``, ``compress_ratios``, ``rope_scaling``), its transformers 5.x rewrite (``layer_types``,
``compress_rates``, ``mlp_layer_types``, ``rope_parameters``) and the official ``inference/config.json``
(ModelArgs names: ``dim``, ``n_layers``, ``rope_factor``...). Every dialect lands in :class:`DSV4Config`,
whose ``compress_ratios`` always covers the MTP layers too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

__all__ = ["DSV4Config", "load_config"]

_TYPE_TO_RATIO_NAME = {"sliding_attention": 0}  # the other two come from ``compress_rates``

# ModelArgs name -> HF name, for the fields that differ (docs/dsv4-architecture.md §1.3).
_OFFICIAL_TO_HF = {
    "dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers", "n_mtp_layers": "num_nextn_predict_layers",
    "n_heads": "num_attention_heads", "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func", "route_scale": "routed_scaling_factor", "rope_head_dim": "qk_rope_head_dim",
    "norm_eps": "rms_norm_eps", "window_size": "sliding_window",
}
_OFFICIAL_ROPE = {"original_seq_len": "original_max_position_embeddings", "rope_factor": "factor",
                  "beta_fast": "beta_fast", "beta_slow": "beta_slow"}


@dataclass(frozen=True)
class DSV4Config:
    """Normalised DSv4 hyper-parameters; names follow the upstream ModelArgs vocabulary."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_hash_layers: int
    n_mtp_layers: int
    compress_ratios: tuple[int, ...]      # length n_layers + n_mtp_layers; MTP layers are sliding (0)
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    window_size: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 1.0
    original_seq_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 1 << 20
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)
    dialect: str = field(default="hf", compare=False)

    def __post_init__(self) -> None:
        want = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != want:
            raise ConfigError("compress_ratios", expected=f"{want} entries (layers + MTP layers)",
                              found=len(self.compress_ratios))
        bad = sorted({r for r in self.compress_ratios if r < 0})
        if bad:
            raise ConfigError("compress_ratios", expected="ratios >= 0", found=bad)
        if self.n_heads % self.o_groups:
            raise ConfigError("o_groups", expected=f"a divisor of n_heads={self.n_heads}", found=self.o_groups)
        if not 0 < self.rope_head_dim <= self.head_dim:
            raise ConfigError("qk_rope_head_dim", expected=f"in (0, head_dim={self.head_dim}]",
                              found=self.rope_head_dim)

    # ---- derived ----
    def ratio(self, layer: int) -> int:
        """Compress ratio of a main layer (0..L-1) or an MTP layer (L..L+K-1)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        """Hash-routed (``tid2eid``) layers are the first ``n_hash_layers`` main layers; never MTP."""
        return layer < min(self.n_hash_layers, self.n_layers)

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DSV4Config:
        """Read any dialect; unknown keys are ignored, missing required ones raise :class:`ConfigError`."""
        d = dict(raw)
        if "text_config" in d and "hidden_size" not in d:  # VL wrapper
            d = {**d["text_config"], "quantization_config": d.get("quantization_config")}
        dialect = "official" if ("dim" in d or "n_layers" in d) else "hf"
        if dialect == "official":
            for off, hf in _OFFICIAL_TO_HF.items():
                if off in d and hf not in d:
                    d[hf] = d[off]
            rope = {hf: d[off] for off, hf in _OFFICIAL_ROPE.items() if off in d}
            if rope:
                d.setdefault("rope_scaling", {"type": "yarn", **rope})
        L = _req(d, "num_hidden_layers")
        n_mtp = int(d.get("num_nextn_predict_layers", 0) or 0)
        ratios = _ratios(d, L, n_mtp)
        rope = _yarn(d)
        return cls(
            vocab_size=_req(d, "vocab_size"), dim=_req(d, "hidden_size"), n_layers=L,
            n_heads=_req(d, "num_attention_heads"), head_dim=int(d.get("head_dim", 512)),
            rope_head_dim=int(d.get("qk_rope_head_dim") or _rope_dim_from_factor(d)),
            q_lora_rank=_req(d, "q_lora_rank"), o_groups=_req(d, "o_groups"), o_lora_rank=_req(d, "o_lora_rank"),
            n_routed_experts=_req(d, "n_routed_experts"), n_shared_experts=int(d.get("n_shared_experts", 1)),
            n_activated_experts=_req(d, "num_experts_per_tok"), moe_inter_dim=_req(d, "moe_intermediate_size"),
            n_hash_layers=_hash_layers(d), n_mtp_layers=n_mtp, compress_ratios=ratios,
            score_func=str(d.get("scoring_func", "sqrtsoftplus")),
            route_scale=float(d.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)), swiglu_limit=float(d.get("swiglu_limit", 10.0)),
            window_size=int(d.get("sliding_window", 128)), rope_theta=float(rope["main_theta"]),
            compress_rope_theta=float(rope["compress_theta"]), rope_factor=float(rope["factor"]),
            original_seq_len=int(rope["original"]), beta_fast=float(rope["beta_fast"]),
            beta_slow=float(rope["beta_slow"]), index_n_heads=int(d.get("index_n_heads", 64)),
            index_head_dim=int(d.get("index_head_dim", 128)), index_topk=int(d.get("index_topk", 512)),
            hc_mult=int(d.get("hc_mult", 4)), hc_sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(d.get("hc_eps", 1e-6)), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 1 << 20)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            quantization_config=d.get("quantization_config"), dialect=dialect,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The published HF-style ``config.json`` form (what our artifacts write)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": 1, "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim, "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "num_experts_per_tok": self.n_activated_experts,
            "moe_intermediate_size": self.moe_inter_dim, "num_hash_layers": self.n_hash_layers,
            "num_nextn_predict_layers": self.n_mtp_layers, "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "sliding_window": self.window_size, "swiglu_limit": self.swiglu_limit,
            "scoring_func": self.score_func, "topk_method": "noaux_tc", "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.route_scale, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": {"type": "yarn", "factor": self.rope_factor,
                             "original_max_position_embeddings": self.original_seq_len,
                             "beta_fast": self.beta_fast, "beta_slow": self.beta_slow},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": self.torch_dtype,
            "hidden_act": "silu", "compress_ratios": list(self.compress_ratios),
        }
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config
        return out

    def replace(self, **changes: Any) -> DSV4Config:
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        vals.update(changes)
        return DSV4Config(**vals)

    def without_mtp(self) -> DSV4Config:
        """The main model alone: no MTP layers, and ``compress_ratios`` cut to the main layers (a model built
        from it has no ``mtp`` blocks; what a main-only load or the vLLM target model builds)."""
        return self.replace(n_mtp_layers=0, compress_ratios=self.compress_ratios[: self.n_layers])


def load_config(path: str) -> DSV4Config:
    """Read ``config.json`` from an artifact directory (or a path to the json itself)."""
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(p) as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(file=p, hint="no config.json: every artifact needs one to plan a load") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e})", file=p) from None
    try:
        return DSV4Config.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(str(e), file=p) from None


# ---- helpers ----
def _req(d: dict[str, Any], key: str) -> int:
    if d.get(key) is None:
        raise ConfigError(key, expected="a value", found="nothing", hint="required DSv4 config field")
    return int(d[key])


def _rope_dim_from_factor(d: dict[str, Any]) -> int:
    if "partial_rotary_factor" in d:
        return round(float(d["partial_rotary_factor"]) * int(d.get("head_dim", 512)))
    return 64


def _ratios(d: dict[str, Any], L: int, n_mtp: int) -> tuple[int, ...]:
    if d.get("compress_ratios") is not None:
        r = [int(x) for x in d["compress_ratios"]]
        if len(r) < L:
            raise ConfigError("compress_ratios", expected=f">= {L} entries", found=len(r))
        # MTP layers: take the published trailing entries; a missing one is sliding
        # (``docs/dsv4-architecture.md §1.2``).
        mtp = [r[L + k] if L + k < len(r) else 0 for k in range(n_mtp)]
        return tuple(r[:L] + mtp)
    if d.get("layer_types") is not None:
        rates = dict(d.get("compress_rates") or {})
        rates.update(_TYPE_TO_RATIO_NAME)
        rates.setdefault("compressed_sparse_attention", 4)
        rates.setdefault("heavily_compressed_attention", 128)
        types = list(d["layer_types"])[:L]
        unknown = sorted({t for t in types if t not in rates})
        if unknown or len(types) != L:
            raise ConfigError("layer_types", expected=f"{L} known layer types", found=unknown or len(types))
        # transformers truncates to L and loses the MTP entry: the MTP layer is sliding + moe
        # (``docs/dsv4-architecture.md §1.4``).
        return tuple(int(rates[t]) for t in types) + (0,) * n_mtp
    raise ConfigError("compress_ratios", expected="compress_ratios or layer_types", found="neither")


def _hash_layers(d: dict[str, Any]) -> int:
    if d.get("num_hash_layers") is not None:
        return int(d["num_hash_layers"])
    if d.get("mlp_layer_types") is not None:
        return sum(1 for t in d["mlp_layer_types"] if t == "hash_moe")
    return 0


def _yarn(d: dict[str, Any]) -> dict[str, float]:
    """RoPE parameters: main theta, compress theta, and YaRN factor/original length/betas."""
    out = {"main_theta": float(d.get("rope_theta", 10000.0)),
           "compress_theta": float(d.get("compress_rope_theta", 160000.0)),
           "factor": 1.0, "original": 0, "beta_fast": 32.0, "beta_slow": 1.0}
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if isinstance(params, dict) and "compress" in params:       # transformers 5.x nested form
        main, params = params.get("main") or {}, params["compress"] or {}
        out["main_theta"] = float(main.get("rope_theta", out["main_theta"]))
        out["compress_theta"] = float(params.get("rope_theta", out["compress_theta"]))
    if params:
        out["factor"] = float(params.get("factor", 1.0))
        out["original"] = int(params.get("original_max_position_embeddings", 0))
        out["beta_fast"] = float(params.get("beta_fast", 32.0))
        out["beta_slow"] = float(params.get("beta_slow", 1.0))
    return out
