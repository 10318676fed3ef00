"""The canonical parameter space a config implies: every module and tensor, with its logical shape.

Linear modules are named by module path (``layers.0.attn.wq_a``) and filled by the roles of whatever quant
scheme is on disk; plain tensors (norms, hc mixers, sinks, biases, tables) are named in full. Shapes follow
``docs/dsv4-architecture.md §4-10`` and the published Flash inventory.
"""
from __future__ import annotations

from functools import partial
from itertools import cycle, repeat
from typing import NamedTuple

from ..config import DSV4Config
from ..quant.groups import group_of

__all__ = ["ParamSpec", "Counts", "expected_params", "LINEAR", "FLOAT", "INDEX"]

LINEAR, FLOAT, INDEX = "linear", "float", "index"


class ParamSpec(NamedTuple):
    """One expected parameter: canonical name, logical shape, kind, quant group and part (main / mtp.K).

    A named tuple: Flash expects 35k of them per plan, built in bulk.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    group: str
    part: str


_spec = partial(tuple.__new__, ParamSpec)


class Counts(NamedTuple):
    """The counts that multiply the parameter space: decoder layers, MTP layers, routed experts per block.

    The config's own (``of``) unless the plan has found config.json declaring more than the tensors on disk
    hold (``config_check.count_contradictions``): then the space is built only as far as the tensors go, the
    contradiction being reported once, instead of millions of "missing" lines (or a MemoryError)."""

    layers: int
    mtp_layers: int
    experts: int

    @classmethod
    def of(cls, cfg: DSV4Config) -> "Counts":
        return cls(cfg.n_layers, cfg.n_mtp_layers, cfg.n_routed_experts)


class _Experts(NamedTuple):
    """The routed experts' local names (``ffn.experts.{e}.{w1,w3,w2}``) and shapes, the same in every block
    (one shape tuple each, shared by every expert of every layer)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    count: int                              # the router's width too


def _block(p: str, cfg: DSV4Config, layer: int, part: str, experts: _Experts) -> list[ParamSpec]:
    D, H, d, q = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    G, N, r = cfg.o_groups, cfg.hc_mult, cfg.ratio(layer)
    I, E, Ish = cfg.moe_inter_dim, experts.count, cfg.moe_inter_dim * cfg.n_shared_experts
    out: list[ParamSpec] = []

    def lin(name: str, o: int, i: int) -> None:
        out.append(ParamSpec(p + name, (o, i), LINEAR, group_of(name), part))

    def flt(name: str, *shape: int) -> None:
        out.append(ParamSpec(p + name, tuple(shape), FLOAT, "other", part))

    flt("attn.attn_sink", H)
    lin("attn.wq_a", q, D); flt("attn.q_norm.weight", q)
    lin("attn.wq_b", H * d, q)
    lin("attn.wkv", d, D); flt("attn.kv_norm.weight", d)
    lin("attn.wo_a", G * cfg.o_lora_rank, H * d // G)
    lin("attn.wo_b", D, G * cfg.o_lora_rank)
    if r > 0:
        c = 2 if r == 4 else 1                      # overlap mode for ratio 4 (``docs/dsv4-architecture.md §6``)
        flt("attn.compressor.ape", r, c * d)
        lin("attn.compressor.wkv", c * d, D); lin("attn.compressor.wgate", c * d, D)
        flt("attn.compressor.norm.weight", d)
    if r == 4:                                      # CSA layers carry the indexer (``docs/dsv4-architecture.md §7``)
        IH, ID = cfg.index_n_heads, cfg.index_head_dim
        lin("attn.indexer.wq_b", IH * ID, q)
        lin("attn.indexer.weights_proj", IH, D)
        flt("attn.indexer.compressor.ape", 4, 2 * ID)
        lin("attn.indexer.compressor.wkv", 2 * ID, D); lin("attn.indexer.compressor.wgate", 2 * ID, D)
        flt("attn.indexer.compressor.norm.weight", ID)
    flt("attn_norm.weight", D); flt("ffn_norm.weight", D)
    for site in ("attn", "ffn"):
        flt(f"hc_{site}_fn", (2 + N) * N, N * D); flt(f"hc_{site}_base", (2 + N) * N); flt(f"hc_{site}_scale", 3)
    lin("ffn.gate", E, D)
    if cfg.is_hash_layer(layer):
        out.append(ParamSpec(p + "ffn.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), INDEX, "other", part))
    else:
        flt("ffn.gate.bias", E)
    # routed experts, w1 w3 w2 per expert: 256 x 3 per layer, so built in one C-level pass
    names = map(p.__add__, experts.names)
    out += map(_spec, zip(names, cycle(experts.shapes), repeat(LINEAR), repeat(group_of("ffn.experts")), repeat(part)))
    lin("ffn.shared_experts.w1", Ish, D); lin("ffn.shared_experts.w3", Ish, D); lin("ffn.shared_experts.w2", D, Ish)
    return out


def _hc_head(p: str, cfg: DSV4Config, part: str) -> list[ParamSpec]:
    N, D = cfg.hc_mult, cfg.dim
    return [ParamSpec(p + "hc_head_fn", (N, N * D), FLOAT, "other", part),
            ParamSpec(p + "hc_head_base", (N,), FLOAT, "other", part),
            ParamSpec(p + "hc_head_scale", (1,), FLOAT, "other", part)]


def expected_params(cfg: DSV4Config, *, include_mtp: bool = True, counts: Counts | None = None) -> list[ParamSpec]:
    """Every parameter of the main model (and of each MTP layer unless ``include_mtp`` is false); ``counts``
    (default: the config's) bounds the layers, MTP layers and experts built. MTP layer ``k`` stays layer
    ``cfg.n_layers + k`` of ``compress_ratios`` whatever the count of main layers built."""
    n = counts or Counts.of(cfg)
    V, D = cfg.vocab_size, cfg.dim
    out = [ParamSpec("embed.weight", (V, D), FLOAT, "embed", "main"),
           ParamSpec("head", (V, D), LINEAR, group_of("head"), "main"),
           ParamSpec("norm.weight", (D,), FLOAT, "other", "main")]
    out += _hc_head("", cfg, "main")
    I = cfg.moe_inter_dim
    experts = _Experts(tuple(f"ffn.experts.{e}.{w}" for e in range(n.experts) for w in ("w1", "w3", "w2")),
                       ((I, D), (I, D), (D, I)), n.experts)
    for i in range(n.layers):
        out += _block(f"layers.{i}.", cfg, i, "main", experts)
    if include_mtp:
        for k in range(n.mtp_layers):
            p, part = f"mtp.{k}.", f"mtp.{k}"
            out += _block(p, cfg, cfg.n_layers + k, part, experts)
            out += [ParamSpec(p + m, (D, D), LINEAR, group_of(m), part) for m in ("e_proj", "h_proj")]
            out += [ParamSpec(p + n, (D,), FLOAT, "other", part) for n in ("enorm.weight", "hnorm.weight", "norm.weight")]
            out += _hc_head(p, cfg, part)
    return out
