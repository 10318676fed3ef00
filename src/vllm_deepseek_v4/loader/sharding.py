"""TP/EP sharding over the load plan: which slice of every parameter (and of each quant role) a rank reads.

``SHARD_RULES`` is data: anchored regexes over a canonical name's *local part* (``layers.N.`` / ``mtp.K.``
removed), each with a shard kind and a reason; every planned parameter matches exactly one row, order never
decides. ``rank_reads`` turns the kind into extra ``narrow`` ops per role, appended after ``Source.ops``; quant
companions are narrowed in proportion to their blocks (``Scheme.block`` in ``quant/scheme.py``), and a split
that cuts a block raises. Choices follow vLLM's DeepSeek-V4 layers (``docs/dsv4-architecture.md §5, §8``,
``docs/checkpoint-formats.md §2.2``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ..errors import AmbiguousRuleError, ConfigError, QuantMismatchError, TensorShapeError, UnmappedTensorError
from ..quant import SCHEMES, cdiv
from .stream import apply_ops

if TYPE_CHECKING:
    from ..config import DSV4Config
    from .plan import ParamPlan, Source

__all__ = ["REPLICATED", "COLUMN", "ROW", "HEADS", "VOCAB", "EXPERT", "KINDS", "ShardRule", "SHARD_RULES",
           "local_name", "shard_rule", "rank_reads", "local_shape", "even_range", "heads_of_rank", "experts_of_rank",
           "apply_ops"]

REPLICATED, COLUMN, ROW, HEADS, VOCAB, EXPERT = "replicated", "column", "row", "heads", "vocab", "expert"
KINDS: Final[tuple[str, ...]] = (REPLICATED, COLUMN, ROW, HEADS, VOCAB, EXPERT)
_DIM: Final[dict[str, int | None]] = {REPLICATED: None, COLUMN: 0, ROW: 1, HEADS: 0, VOCAB: 0}
_SCOPE = re.compile(r"^(?:layers|mtp)\.\d+\.")
_UNIT_NOUN: Final[dict[str, str]] = {"head_dim": "heads", "o_lora_rank": "output groups",
                                      "index_head_dim": "index heads"}

Op = tuple[str | int, ...]    # ("narrow", dim, start, length), as in Source.ops


@dataclass(frozen=True)
class ShardRule:
    """One row of the sharding table: an anchored pattern over the local name, its shard kind, and why.

    ``tp_kind``: for ``EXPERT`` rows, the split used when EP is off (COLUMN for w1/w3, ROW for w2).
    ``unit``: a ``DSV4Config`` field; when a config is given, every rank must hold whole units (heads, groups).
    """

    pattern: re.Pattern[str]
    kind: str
    reason: str
    tp_kind: str | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        src = self.pattern.pattern
        if not self.reason.strip():
            raise ValueError(f"shard rule {src!r} has no reason")
        if not (src.startswith("^") and src.endswith("$")):
            raise ValueError(f"shard rule {src!r} is not anchored ^...$")
        if self.kind not in KINDS:
            raise ValueError(f"shard rule {src!r}: unknown kind {self.kind!r}")
        if (self.kind == EXPERT) != (self.tp_kind in (COLUMN, ROW)):
            raise ValueError(f"shard rule {src!r}: EXPERT rows (and only they) need tp_kind COLUMN or ROW")

    def dim(self, *, ep_size: int = 1) -> int | None:
        """The logical dim split across ranks (0 = out / rows, 1 = in), or None if each rank reads it whole."""
        if self.kind == EXPERT:
            return None if ep_size > 1 else _DIM[self.tp_kind or ""]
        return _DIM[self.kind]


def _r(pattern: str, kind: str, reason: str, **kw: str) -> ShardRule:
    return ShardRule(re.compile(pattern), kind, reason, **kw)


SHARD_RULES: Final[tuple[ShardRule, ...]] = (
    # top level (and the MTP block's own norm / hc_head, which share the local names)
    _r(r"^embed\.weight$", VOCAB, "VocabParallelEmbedding: a rank holds a contiguous range of vocab rows"),
    _r(r"^head$", VOCAB, "ParallelLMHead: a rank computes the logits of its vocab rows, gathered afterwards"),
    _r(r"^norm\.weight$", REPLICATED, "final RMSNorm [D] (top level and mtp.K): hidden states are whole on every rank"),
    _r(r"^hc_head_(?:fn|base|scale)$", REPLICATED, "hc_head mixer over the full [N, D] stream state; small fp32"),
    # attention (``docs/dsv4-architecture.md §5.1``)
    _r(r"^attn\.attn_sink$", HEADS, "one sink logit per head; vLLM narrows attn_sink to the rank's head range"),
    _r(r"^attn\.(?:wq_a|wkv)$", REPLICATED, "q low-rank input and the single shared KV latent are needed whole by "
       "every head (vLLM fused_wqa_wkv is replicated)"),
    _r(r"^attn\.(?:q_norm|kv_norm)\.weight$", REPLICATED, "RMSNorms over the replicated q_lora / KV latent"),
    _r(r"^attn\.wq_b$", COLUMN, "rows are head-major [H*d]: whole heads per rank, matching attn_sink's head range",
       unit="head_dim"),
    _r(r"^attn\.wo_a$", COLUMN, "rows are group-major [G*o_lora] and group g reads only its own H/G heads' outputs "
       "[H*d/G], which are the rank's heads: split rows by whole groups, never the input", unit="o_lora_rank"),
    _r(r"^attn\.wo_b$", ROW, "input is the concatenated group outputs [G*o_lora]; a rank holds its groups' columns "
       "and the partial sums are all-reduced", unit="o_lora_rank"),
    _r(r"^attn\.compressor\.(?:wkv|wgate|ape|norm\.weight)$", REPLICATED, "the compressor builds the one shared "
       "compressed KV that every head attends to (vLLM keeps it replicated)"),
    _r(r"^attn\.indexer\.wq_b$", COLUMN, "rows are index-head-major [IH*ID]: whole index heads per rank; the "
       "per-head weighted scores are all-reduced before the top-k, so every rank picks the same entries",
       unit="index_head_dim"),
    _r(r"^attn\.indexer\.weights_proj$", COLUMN, "one row per index head [IH, D]: the rank's index heads, "
       "matching its wq_b rows"),
    _r(r"^attn\.indexer\.compressor\.(?:wkv|wgate|ape|norm\.weight)$", REPLICATED, "indexer keys, replicated "
       "with the rest of the indexer"),
    # block norms and hyper-connections (``docs/dsv4-architecture.md §4``)
    _r(r"^(?:attn_norm|ffn_norm)\.weight$", REPLICATED, "block RMSNorms [D] act on the whole hidden state"),
    _r(r"^hc_(?:attn|ffn)_(?:fn|base|scale)$", REPLICATED, "mHC mixers act on the whole [N, D] stream state"),
    # MoE (``docs/dsv4-architecture.md §8``)
    _r(r"^ffn\.gate$", REPLICATED, "router scores every expert on every rank (vLLM ReplicatedLinear gate)"),
    _r(r"^ffn\.gate\.(?:bias|tid2eid)$", REPLICATED, "selection bias / hash table feed the replicated router"),
    _r(r"^ffn\.experts\.(?P<expert>\d+)\.(?:w1|w3)$", EXPERT, "routed expert gate/up: whole experts per EP rank; "
       "without EP the intermediate rows are split like FusedMoE w13", tp_kind=COLUMN),
    _r(r"^ffn\.experts\.(?P<expert>\d+)\.w2$", EXPERT, "routed expert down: whole experts per EP rank; without EP "
       "the intermediate columns are split like FusedMoE w2", tp_kind=ROW),
    _r(r"^ffn\.shared_experts\.(?:w1|w3)$", COLUMN, "shared expert gate/up: MergedColumnParallelLinear over I"),
    _r(r"^ffn\.shared_experts\.w2$", ROW, "shared expert down: RowParallelLinear over I, all-reduced"),
    # MTP block extras (``docs/dsv4-architecture.md §10``)
    _r(r"^(?:e_proj|h_proj)$", REPLICATED, "MTP input projections [D, D]: vLLM's DeepSeek MTP keeps eh_proj "
       "replicated"),
    _r(r"^(?:enorm|hnorm)\.weight$", REPLICATED, "MTP input RMSNorms [D]"),
)


def local_name(name: str) -> str:
    """The canonical name without its ``layers.N.`` / ``mtp.K.`` scope (top-level names are unchanged)."""
    return _SCOPE.sub("", name, count=1)


def _match(name: str) -> tuple[ShardRule, re.Match[str]]:
    local = local_name(name)
    hits = [(rule, m) for rule in SHARD_RULES for m in [rule.pattern.match(local)] if m]
    if not hits:
        raise UnmappedTensorError(tensor=name, expected="exactly one sharding rule", found="none",
                                  hint=f"add a row for {local!r} with its reason to SHARD_RULES (loader/sharding.py)")
    if len(hits) > 1:
        raise AmbiguousRuleError(tensor=name, expected="exactly one sharding rule",
                                 found=f"{len(hits)} rows: " + "; ".join(
                                     f"{r.pattern.pattern} ({r.reason})" for r, _ in hits))
    return hits[0]


def shard_rule(name: str) -> ShardRule:
    """The one table row for canonical parameter ``name`` (module path for linears, full name otherwise)."""
    return _match(name)[0]


def _check_rank(rank: int, size: int, by: str) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside [0, {size}) for {by}={size}")


def even_range(total: int, rank: int, size: int, what: str, by: str) -> range:
    """The contiguous, equal share of ``total`` units (heads, groups, rows) ``rank`` holds; ConfigError naming
    ``what`` when ``size`` does not divide it."""
    _check_rank(rank, size, by)
    if total % size:
        raise ConfigError(what, expected=f"a multiple of {by}={size}", found=total,
                          hint=f"choose {by} among the divisors of {total}")
    n = total // size
    return range(rank * n, (rank + 1) * n)


def heads_of_rank(n_heads: int, tp_rank: int, tp_size: int) -> range:
    """Attention heads ``tp_rank`` holds: a contiguous, equal range (vLLM's TP head split)."""
    return even_range(n_heads, tp_rank, tp_size, "num_attention_heads", "tp_size")


def experts_of_rank(n_experts: int, ep_rank: int, ep_size: int) -> range:
    """Routed experts ``ep_rank`` owns: a contiguous, equal range of whole experts (vLLM linear expert placement)."""
    return even_range(n_experts, ep_rank, ep_size, "n_routed_experts", "ep_size")


def rank_reads(pp: ParamPlan, *, tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1,
               cfg: DSV4Config | None = None) -> dict[str, tuple[Op, ...]]:
    """Extra ops per role (to append after ``Source.ops``) that take this rank's slice of ``pp``.

    An empty dict means the rank holds none of it (a routed expert another EP rank owns); ``()`` means
    the whole role. Under EP, routed experts are whole and not TP-split. ``cfg`` adds the whole-head /
    whole-group checks the shapes alone cannot make, and is required when ``ep_size > 1``.
    A w4a16 ``weight_shape`` is returned unsliced: it still holds the full logical shape.
    """
    name = pp.spec.name
    rule, m = _match(name)
    _check_rank(tp_rank, tp_size, "tp_size")
    _check_rank(ep_rank, ep_size, "ep_size")
    if rule.kind == EXPERT and ep_size > 1:
        if cfg is None:
            raise ValueError(f"{name}: rank_reads needs cfg (n_routed_experts) when ep_size > 1")
        if int(m.group("expert")) not in experts_of_rank(cfg.n_routed_experts, ep_rank, ep_size):
            return {}
        return {role: () for role in pp.roles}
    dim = rule.dim(ep_size=ep_size)
    if dim is None or tp_size == 1:
        return {role: () for role in pp.roles}
    kind = rule.tp_kind if rule.tp_kind is not None else rule.kind
    full = pp.spec.shape[dim]
    anchor = _anchor(pp)
    if full % tp_size:
        raise TensorShapeError(file=anchor.file, tensor=anchor.tensor,
                               expected=f"{kind} split of {name} dim {dim} ({full}) into tp_size={tp_size} equal parts",
                               found=f"{full} % {tp_size} = {full % tp_size}",
                               hint=f"choose tp_size among the divisors of {full}")
    n = full // tp_size
    start = tp_rank * n
    if kind == HEADS:
        heads = heads_of_rank(full, tp_rank, tp_size)
        start, n = heads.start, len(heads)
    if cfg is not None and rule.unit is not None:
        unit = int(getattr(cfg, rule.unit))
        if n % unit:
            raise TensorShapeError(file=anchor.file, tensor=anchor.tensor,
                                   expected=f"whole {_UNIT_NOUN[rule.unit]} ({rule.unit}={unit} each) of {name} "
                                   f"per rank",
                                   found=f"{n} per rank at tp_size={tp_size}",
                                   hint=f"choose tp_size among the divisors of {full // unit}")
    return {role: _role_ops(pp, role, src, kind, dim, start, n, full, tp_rank, tp_size)
            for role, src in pp.roles.items()}


def local_shape(pp: ParamPlan, *, tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1,
                cfg: DSV4Config | None = None) -> tuple[int, ...] | None:
    """The logical shape of ``pp`` on this rank (None when the rank holds none of it): what a w4a16
    ``weight_shape`` must say once its codes and scales are the rank's slices."""
    reads = rank_reads(pp, tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank, ep_size=ep_size, cfg=cfg)
    if not reads:
        return None
    shape = list(pp.spec.shape)
    dim = _match(pp.spec.name)[0].dim(ep_size=ep_size)
    if dim is not None and tp_size > 1:
        shape[dim] //= tp_size
    return tuple(shape)


def _anchor(pp: ParamPlan) -> Source:
    return next(iter(pp.roles.values()))


def _role_ops(pp: ParamPlan, role: str, src: Source, kind: str, dim: int, start: int, n: int, full: int,
              tp_rank: int, tp_size: int) -> tuple[Op, ...]:
    """The narrow of one role: logical [start, start+n) of ``full`` on ``dim``, divided by the role's block."""
    name, scheme = pp.spec.name, pp.scheme
    f = 1                                                         # plain tensor: stored as its logical shape
    if pp.quant is not None:
        record = SCHEMES[scheme]
        if not record.has(role):
            raise QuantMismatchError(file=src.file, tensor=src.tensor, expected=f"a role with a known block layout "
                                     f"for {scheme}", found=role, hint="add it to its Scheme in quant/scheme.py")
        group = None
        if record.group_on_disk and dim == 1:                     # w4a16: the group is in / scale columns
            group = pp.spec.shape[1] // pp.roles[record.scale or ""].shape[1]
        blocks = record.block(role, group=group)
        if blocks is None:                                        # scalars and weight_shape: read whole
            return ()
        f = blocks[dim]
    stored = cdiv(full, f)
    if len(src.shape) <= dim or src.shape[dim] != stored:
        raise TensorShapeError(file=src.file, tensor=src.tensor, expected=f"dim {dim} of {stored} for the "
                               f"{scheme or 'plain'} {role} of {name} ({full} / {f})", found=list(src.shape))
    if n % f:
        what = "out features" if dim == 0 else "in features"
        raise TensorShapeError(file=src.file, tensor=src.tensor,
                               expected=f"{kind} slices of {name} dim {dim} ({what}) aligned to the {f}-element blocks "
                               f"of its {scheme} {role}",
                               found=f"{n} per rank at tp_size={tp_size} "
                               f"(rank {tp_rank}: [{start}, {start + n}) of {full})",
                               hint=f"choose a tp_size for which {full} / tp_size is a multiple of {f}")
    return (("narrow", dim, start // f, n // f),)
