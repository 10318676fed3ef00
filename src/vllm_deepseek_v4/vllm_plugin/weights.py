"""Fill our modules from vLLM's weight iterator through OUR load plan (no vLLM import: testable alone).

vLLM streams ``(on-disk name, tensor)`` pairs of every shard it chose to read. The plan (built from the
safetensors headers at model-construction time) already knows, for every on-disk tensor, which canonical
parameter role(s) it fills and how (fused sources are sliced by ``ops``; extra copies of the shared
``embed``/``head`` are aliases whose values must agree). :class:`PlanRouter` replays that knowledge on vLLM's
stream, one tensor at a time, and :func:`assign` puts each canonical tensor into its module exactly as
``loader.load.load_model`` does. ``finish`` is the strict end-of-load accounting: every wanted key filled,
every streamed tensor known to the plan, every alias checked.

Under tensor/expert parallelism (a ``parallel`` context) each target's ops are extended with the rank's slice
from ``loader.sharding.rank_reads`` (quant companions on their block boundaries; a split that cuts a block or
a head/group raises at construction, i.e. at startup). vLLM's safetensors iterator yields memory-mapped
tensors, so narrowing before ``contiguous`` reads only the rank's bytes; parameters another EP rank owns are
no target here at all (``is_unused_checkpoint_weight`` lets vLLM skip them).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import AliasMismatchError, MissingTensorError, PlanError
from ..loader.load import assign_tensor as assign, check_filled  # noqa: F401  (used by model.py / mtp.py)
from ..loader.plan import LoadPlan
from ..loader.sharding import local_shape, rank_reads
from ..loader.stream import apply_ops
from ..loader.values import plan_checks, value_checks_enabled
from ..model.parallel import SINGLE, Parallel
from ..quant import SCHEMES
from ..quant.scheme import SHAPE

__all__ = ["PlanRouter", "assign", "check_filled"]


@dataclass(frozen=True)
class _Target:
    key: str                        # canonical key this (slice of the) tensor fills
    ops: tuple[tuple, ...]          # select / narrow / t steps applied to the on-disk tensor
    alias: bool                     # an extra copy of a shared tensor: compared, never assigned
    shape: tuple[int, ...] | None = None   # w4a16 weight_shape of a sharded rank: replaced by its local shape


def _key(name: str, quant: object, role: str) -> str:
    return name if quant is None else f"{name}.{role}"


def _local_shape_tensor(t: torch.Tensor, local: tuple[int, ...], key: str, name: str, path: str) -> torch.Tensor:
    """A w4a16 ``weight_shape`` holds the full logical shape on disk; a TP rank's codes are a slice of it."""
    from ..errors import TensorShapeError

    if t.numel() != len(local):
        raise TensorShapeError(file=path, tensor=name, expected=f"a [{len(local)}] weight_shape for {key}",
                               found=list(t.shape))
    return torch.tensor(local, dtype=t.dtype)


class PlanRouter:
    """Route vLLM's ``(name, tensor)`` stream to the canonical keys ``wanted`` by one model.

    ``wanted(key)`` selects this model's share of the plan (the target skips ``mtp.*``; the draft keeps
    ``mtp.*`` and the shared ``embed``/``head``). On-disk tensors the plan fills for the *other* model, or
    explains (e.g. a hash layer's unused bias), are skipped; a tensor the plan has never seen is an error.
    """

    def __init__(self, plan: LoadPlan, wanted: Callable[[str], bool], parallel: Parallel = SINGLE) -> None:
        plan.raise_if_bad()
        self.plan = plan
        self.targets: dict[str, list[_Target]] = {}
        self.wanted: set[str] = set()
        self._aliased: set[str] = set()
        rank = dict(tp_rank=parallel.tp_rank, tp_size=parallel.tp_size, ep_rank=parallel.ep_rank,
                    ep_size=parallel.ep_size, cfg=plan.cfg)
        for name, pp in plan.params.items():
            keys = [_key(name, pp.quant, role) for role in pp.roles]
            mine = [k for k in keys if wanted(k)]
            if not mine:
                continue
            reads = rank_reads(pp, **rank)                 # {} : another EP rank's expert
            if not reads:
                continue
            for role, src in pp.roles.items():
                k = _key(name, pp.quant, role)
                shape = None
                if pp.quant is not None and SCHEMES[pp.scheme].role(role).kind == SHAPE and parallel.tp_size > 1:
                    shape = local_shape(pp, **rank)
                self.targets.setdefault(src.tensor, []).append(_Target(k, src.ops + reads[role], False, shape))
                self.wanted.add(k)
            if pp.aliases:
                if len(keys) != 1:
                    raise PlanError([f"{name}: aliased copies of a multi-role parameter ({', '.join(keys)}) "
                                     "cannot be compared role by role"], file=plan.path)
                self._aliased.add(keys[0])
                extra = reads[next(iter(pp.roles))]
                for a in pp.aliases:
                    self.targets.setdefault(a.tensor, []).append(_Target(keys[0], a.ops + extra, True))
        self.filled: set[str] = set()
        self._primary: dict[str, torch.Tensor] = {}       # values of aliased keys, until every copy is checked
        self._pending: dict[str, list[tuple[str, torch.Tensor]]] = {}   # aliases seen before their primary
        self._seen_aliases: set[tuple[str, str]] = set()
        # each tensor's values checked by its role as it streams (loader.values; DSV4_SKIP_VALUE_CHECKS=1: off)
        self._checks = plan_checks(plan) if value_checks_enabled(plan.path) else {}

    def route(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(canonical key, tensor)`` for every wanted key, comparing aliases on the way."""
        known = self.plan.checkpoint.tensors
        for name, tensor in weights:
            targets = self.targets.get(name)
            if targets is None:
                if name not in known:
                    raise MissingTensorError(file=self.plan.path, tensor=name, hint="vLLM streamed a tensor the "
                                             "load plan never saw in the safetensors headers (files changed?)")
                continue
            for tgt in targets:
                t = apply_ops(tensor, tgt.ops).contiguous() if tgt.ops else tensor
                if tgt.shape is not None:
                    t = _local_shape_tensor(t, tgt.shape, tgt.key, name, self.plan.path)
                check = None if tgt.alias else self._checks.get((name, tgt.key))
                if check is not None:
                    check.check(t, tgt.ops)
                if tgt.alias:
                    self._alias(tgt.key, name, t)
                    continue
                if tgt.key in self.filled:
                    raise PlanError([f"{tgt.key}: filled twice (second source {name})"], file=self.plan.path)
                self.filled.add(tgt.key)
                if tgt.key in self._aliased:
                    self._primary[tgt.key] = t
                    for alias_name, a in self._pending.pop(tgt.key, []):
                        self._compare(tgt.key, alias_name, a)
                yield tgt.key, t

    def _alias(self, key: str, name: str, t: torch.Tensor) -> None:
        self._seen_aliases.add((key, name))
        if key in self._primary:
            self._compare(key, name, t)
        else:
            self._pending.setdefault(key, []).append((name, t))

    def _compare(self, key: str, name: str, a: torch.Tensor) -> None:
        t = self._primary[key]
        if a.shape != t.shape:
            raise AliasMismatchError(file=self.plan.path, tensor=name, expected=f"shape {list(t.shape)} of {key}",
                                     found=list(a.shape))
        diff = (a.float() - t.float()).abs().max().item() if t.numel() else 0.0
        if diff != 0.0:
            raise AliasMismatchError(file=self.plan.path, tensor=name, expected=f"the values of {key}",
                                     found=f"max abs difference {diff:g}",
                                     hint="two copies of a shared tensor disagree; which one the draft should use "
                                          "is unknown")

    def finish(self) -> None:
        """Strict accounting at the end of the stream; frees the alias reference copies."""
        missing = sorted(self.wanted - self.filled)
        if missing:
            raise MissingTensorError(file=self.plan.path, tensor=missing[0],
                                     hint=f"{len(missing)} planned tensor(s) never arrived from vLLM's weight "
                                          f"iterator: {', '.join(missing[:10])}")
        unchecked = sorted(k for k in self._pending)
        if unchecked:
            raise MissingTensorError(file=self.plan.path, tensor=unchecked[0],
                                     hint="aliased copies arrived but the primary tensor never did")
        expected_aliases = {(t.key, name) for name, ts in self.targets.items() for t in ts if t.alias}
        skipped = sorted(expected_aliases - self._seen_aliases)
        if skipped:
            raise MissingTensorError(file=self.plan.path, tensor=skipped[0][1],
                                     hint="this copy of a shared tensor was never streamed, so its agreement with "
                                          f"{skipped[0][0]} is unchecked")
        self._primary.clear()
