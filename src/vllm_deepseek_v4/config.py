"""One DSv4 config record, read from either field-name dialect.

Dialects (``docs/dsv4-architecture.md §1``): the published HF-style ``config.json``
(``hidden_size``, ``compress_ratios``, ``rope_scaling``), its transformers 5.x rewrite (``layer_types``,
``compress_rates``, ``mlp_layer_types``, ``rope_parameters``) and the official ``inference/config.json``
(ModelArgs names: ``dim``, ``n_layers``, ``rope_factor``...). Every dialect lands in :class:`DSV4Config`,
whose ``compress_ratios`` always covers the MTP layers too.
"""
from __future__ import annotations

import json
import math
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


# Fields that size a tensor or a loop: 0 or less is never a model (and some would divide by zero).
_POSITIVE = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_groups",
             "o_lora_rank", "n_routed_experts", "n_activated_experts", "moe_inter_dim", "window_size",
             "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters")
# DSV4Config field -> its config.json name, for messages.
_HF_NAME = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "rope_head_dim": "qk_rope_head_dim", "n_activated_experts": "num_experts_per_tok",
            "moe_inter_dim": "moe_intermediate_size", "n_hash_layers": "num_hash_layers",
            "n_mtp_layers": "num_nextn_predict_layers", "window_size": "sliding_window",
            "original_seq_len": "rope_scaling.original_max_position_embeddings"}


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
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ConfigError(_HF_NAME.get(name, name), expected="a positive integer", found=getattr(self, name))
        for name in ("n_shared_experts", "n_hash_layers", "n_mtp_layers", "original_seq_len"):
            if getattr(self, name) < 0:
                raise ConfigError(_HF_NAME.get(name, name), expected="an integer >= 0", found=getattr(self, name))
        if self.n_activated_experts > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok", expected=f"at most n_routed_experts={self.n_routed_experts}",
                              found=self.n_activated_experts)
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
        """Read any dialect; unknown keys are ignored, missing required ones and values of the wrong type raise
        :class:`ConfigError` naming the field."""
        if not isinstance(raw, dict):
            raise ConfigError("config", expected="a JSON object of DSv4 fields", found=type(raw).__name__)
        d = dict(raw)
        if "text_config" in d and "hidden_size" not in d:  # VL wrapper
            d = {**_typed(d, "text_config", dict), "quantization_config": d.get("quantization_config")}
        dialect = "official" if ("dim" in d or "n_layers" in d) else "hf"
        if dialect == "official":
            for off, hf in _OFFICIAL_TO_HF.items():
                if off in d and hf not in d:
                    d[hf] = d[off]
            rope = {hf: d[off] for off, hf in _OFFICIAL_ROPE.items() if off in d}
            if rope:
                d.setdefault("rope_scaling", {"type": "yarn", **rope})
        L = _int(d, "num_hidden_layers")
        n_mtp = _int(d, "num_nextn_predict_layers", 0)
        ratios = _ratios(d, L, n_mtp)
        rope = _yarn(d)
        return cls(
            vocab_size=_int(d, "vocab_size"), dim=_int(d, "hidden_size"), n_layers=L,
            n_heads=_int(d, "num_attention_heads"), head_dim=_int(d, "head_dim", 512),
            rope_head_dim=_int(d, "qk_rope_head_dim", 0) or _rope_dim_from_factor(d),
            q_lora_rank=_int(d, "q_lora_rank"), o_groups=_int(d, "o_groups"), o_lora_rank=_int(d, "o_lora_rank"),
            n_routed_experts=_int(d, "n_routed_experts"), n_shared_experts=_int(d, "n_shared_experts", 1),
            n_activated_experts=_int(d, "num_experts_per_tok"), moe_inter_dim=_int(d, "moe_intermediate_size"),
            n_hash_layers=_hash_layers(d), n_mtp_layers=n_mtp, compress_ratios=ratios,
            score_func=_typed(d, "scoring_func", str, "sqrtsoftplus"),
            route_scale=_float(d, "routed_scaling_factor", 1.0),
            norm_topk_prob=_typed(d, "norm_topk_prob", bool, True), swiglu_limit=_float(d, "swiglu_limit", 10.0),
            window_size=_int(d, "sliding_window", 128), rope_theta=rope["main_theta"],
            compress_rope_theta=rope["compress_theta"], rope_factor=rope["factor"],
            original_seq_len=int(rope["original"]), beta_fast=rope["beta_fast"],
            beta_slow=rope["beta_slow"], index_n_heads=_int(d, "index_n_heads", 64),
            index_head_dim=_int(d, "index_head_dim", 128), index_topk=_int(d, "index_topk", 512),
            hc_mult=_int(d, "hc_mult", 4), hc_sinkhorn_iters=_int(d, "hc_sinkhorn_iters", 20),
            hc_eps=_float(d, "hc_eps", 1e-6), norm_eps=_float(d, "rms_norm_eps", 1e-6),
            tie_word_embeddings=_typed(d, "tie_word_embeddings", bool, False),
            max_position_embeddings=_int(d, "max_position_embeddings", 1 << 20),
            torch_dtype=str(_typed(d, "torch_dtype", str, "") or _typed(d, "dtype", str, "bfloat16")),
            quantization_config=_typed(d, "quantization_config", dict, None), dialect=dialect,
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
    """Read ``config.json`` from an artifact directory (or a path to the json itself).

    A path to one ``.safetensors`` file or to an ``.index.json`` (what the checkpoint scan also accepts) reads
    the ``config.json`` beside it: read as the config itself, a shard was reported as "not valid JSON" and an
    index as a config without ``num_hidden_layers``."""
    p = (os.path.join(path, "config.json") if os.path.isdir(path)
         else os.path.join(os.path.dirname(path), "config.json") if path.endswith((".safetensors", ".index.json"))
         else path)
    if not os.path.lexists(p):
        raise ConfigError("no config.json", file=p, expected="the artifact's config (every artifact needs one to plan "
                          "a load)", found="no such file")
    if not os.path.isfile(p):                 # a directory, a FIFO (never opened: it would block), a broken link
        raise ConfigError(file=p, expected="a regular file", found=_what_is(p))
    try:
        with open(p, "rb") as fh:
            raw = json.loads(fh.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid JSON ({e})", file=p) from None
    except RecursionError:
        raise ConfigError("not valid JSON (nesting too deep)", file=p) from None
    except OSError as e:
        raise ConfigError("unreadable", file=p, expected="a readable file", found=e.strerror) from None
    try:
        return DSV4Config.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(str(e), file=p) from None


def _what_is(p: str) -> str:
    if os.path.isdir(p):
        return "a directory"
    if not os.path.exists(p):
        return "a dangling or looping symlink"
    return "not a regular file (a FIFO, socket or device)"


# ---- helpers ----
_REQUIRED: Any = object()


def _typed(d: dict[str, Any], key: str, kind: Any, default: Any = _REQUIRED) -> Any:
    """``d[key]`` if it is a ``kind`` (None or absent: ``default``, or an error if the field is required)."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(key, expected="a value", found="nothing", hint="required DSv4 config field")
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(key, expected=f"a JSON {_JSON_NAMES[kind]}",
                          found=f"{type(value).__name__} {value!r:.60}")
    return value


_JSON_NAMES: dict[Any, str] = {dict: "object", list: "array", str: "string", bool: "true/false",
                               (int, float): "number"}


def _int(d: dict[str, Any], key: str, default: Any = _REQUIRED) -> int:
    """An integer field; a float that is a whole number (``64.0``) is one, ``64.5`` or ``"64"`` is not."""
    value = _typed(d, key, (int, float), default)
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(key, expected="an integer", found=repr(value))
        return int(value)
    return value


def _float(d: dict[str, Any], key: str, default: Any = _REQUIRED) -> float:
    value = float(_typed(d, key, (int, float), default))
    if not math.isfinite(value):
        raise ConfigError(key, expected="a finite number", found=repr(value))
    return value


def _ints(d: dict[str, Any], key: str) -> list[int]:
    """A list-of-integers field (``compress_ratios``)."""
    values = _typed(d, key, list)
    if set(map(type, values)) <= {int}:         # the usual case, in one C-level pass (a list may be 10^6 long)
        return values
    return [_int({key: v}, key) for v in values]


def _rope_dim_from_factor(d: dict[str, Any]) -> int:
    if "partial_rotary_factor" in d:
        return round(_float(d, "partial_rotary_factor") * _int(d, "head_dim", 512))
    return 64


def _ratios(d: dict[str, Any], L: int, n_mtp: int) -> tuple[int, ...]:
    if d.get("compress_ratios") is not None:
        r = _ints(d, "compress_ratios")
        if len(r) < L:
            raise ConfigError("compress_ratios", expected=f">= {L} entries", found=len(r))
        # MTP layers: take the published trailing entries; a missing one is sliding
        # (``docs/dsv4-architecture.md §1.2``).
        mtp = [r[L + k] if L + k < len(r) else 0 for k in range(n_mtp)]
        return tuple(r[:L] + mtp)
    if d.get("layer_types") is not None:
        rates = dict(_typed(d, "compress_rates", dict, {}))
        rates.update(_TYPE_TO_RATIO_NAME)
        rates.setdefault("compressed_sparse_attention", 4)
        rates.setdefault("heavily_compressed_attention", 128)
        types = list(_typed(d, "layer_types", list))[:L]
        unknown = sorted({repr(t) for t in types if not isinstance(t, str) or t not in rates})
        if unknown or len(types) != L:
            raise ConfigError("layer_types", expected=f"{L} known layer types", found=unknown or len(types))
        # transformers truncates to L and loses the MTP entry: the MTP layer is sliding + moe
        # (``docs/dsv4-architecture.md §1.4``).
        return tuple(_int(rates, t) for t in types) + (0,) * n_mtp
    raise ConfigError("compress_ratios", expected="compress_ratios or layer_types", found="neither")


def _hash_layers(d: dict[str, Any]) -> int:
    if d.get("num_hash_layers") is not None:
        return _int(d, "num_hash_layers")
    if d.get("mlp_layer_types") is not None:
        return sum(1 for t in _typed(d, "mlp_layer_types", list) if t == "hash_moe")
    return 0


def _yarn(d: dict[str, Any]) -> dict[str, float]:
    """RoPE parameters: main theta, compress theta, and YaRN factor/original length/betas."""
    out = {"main_theta": _float(d, "rope_theta", 10000.0), "compress_theta": _float(d, "compress_rope_theta", 160000.0),
           "factor": 1.0, "original": 0, "beta_fast": 32.0, "beta_slow": 1.0}
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = _typed(d, key, dict, {})
    if "compress" in params:                    # transformers 5.x nested form
        main = _typed(params, "main", dict, {})
        params = _typed(params, "compress", dict, {})
        out["main_theta"] = _float(main, "rope_theta", out["main_theta"])
        out["compress_theta"] = _float(params, "rope_theta", out["compress_theta"])
    if params:
        try:
            out["factor"] = _float(params, "factor", 1.0)
            out["original"] = _int(params, "original_max_position_embeddings", 0)
            out["beta_fast"] = _float(params, "beta_fast", 32.0)
            out["beta_slow"] = _float(params, "beta_slow", 1.0)
        except ConfigError as e:                # name the field as config.json nests it
            raise ConfigError(f"{key}.{e}") from None
    return out
