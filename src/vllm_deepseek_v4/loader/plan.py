"""The load plan: before reading one weight, know where every parameter comes from and in what format.

Strict accounting: every expected parameter is filled exactly once, every tensor on disk is used or
explained by a rule with a written reason. Shared ``embed``/``head`` are routed to the MTP draft explicitly;
copies of them inside ``mtp.K`` are aliases, checked for shape here and for value when loading.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any

from ..checkpoint import Checkpoint, scan_checkpoint
from ..checkpoint.scan import gc_paused
from ..config import DSV4Config, load_config
from ..errors import DSV4Error, PlanError
from ..naming import CONVENTIONS, Resolver, resolve_names
from .account import SHARED, AnySource, Found, ParamPlan, Source, account
from .expected import expected_params

__all__ = ["Source", "ParamPlan", "LoadPlan", "build_plan"]

# ParamPlan -> its spec's part / group, its scheme; whether it is a linear (has a detected scheme)
_PART, _GROUP = attrgetter("spec.part"), attrgetter("spec.group")
_SCHEME, _QUANT = attrgetter("quant.scheme"), itemgetter(2)
_TRANSFORMERS_HINT = ("the artifact has no mtp.* tensors although config.json declares num_nextn_predict_layers={n}; "
                      "this happens when a checkpoint is saved through transformers (which drops mtp.*) or "
                      "llm-compressor; restore the block from the original release or pass --no-mtp")


@dataclass
class LoadPlan:
    """Everything known about an artifact before loading it; ``ok`` only if nothing is unexplained."""

    path: str
    cfg: DSV4Config
    checkpoint: Checkpoint
    include_mtp: bool
    params: dict[str, ParamPlan] = field(default_factory=dict)
    unmapped: list[dict[str, str]] = field(default_factory=list)
    missing: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    explained: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    naming: str = "upstream"

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.errors)

    def problems(self) -> list[str]:
        """One line per problem, each naming the tensor (and file) or parameter."""
        out = list(self.errors)
        out += [f"{u['file']}: {u['name']}: unmapped: {u['reason']}" for u in self.unmapped]
        out += [f"{m['param']}: missing: {m['reason']}" for m in self.missing]
        return out

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise PlanError(self.problems(), file=self.path)

    def quant_report(self) -> dict[str, dict[str, str]]:
        """Scheme per quant group, separately for the trunk and for each MTP layer."""
        seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        linears = list(filter(_QUANT, self.params.values()))             # one C pass over 35k parameters
        for part, group, scheme in set(zip(map(_PART, linears), map(_GROUP, linears), map(_SCHEME, linears))):
            if group != "head":
                seen[part][group].add(scheme)
        return {part: {g: (s.pop() if len(s) == 1 else "mixed:" + "+".join(sorted(s))) for g, s in sorted(groups.items())}
                for part, groups in sorted(seen.items(), key=lambda kv: (kv[0] != "main", kv[0]))}

    def mtp_report(self) -> dict[str, Any]:
        n = self.cfg.n_mtp_layers if self.include_mtp else 0
        parts = {f"mtp.{k}" for k in range(n)}
        missing_mtp = [m for m in self.missing if m["param"].startswith("mtp.")]
        shared = {}
        for key, label in (("embed.weight", "embed"), ("head", "head")):
            pp = self.params.get(key)
            shared[label] = pp.roles["weight" if key == "head" else "tensor"].tensor if pp else None
        complete = bool(parts) and not missing_mtp and parts <= self._parts() and not any(
            "mtp" in e for e in self.errors)
        return {"complete": complete, "layers": n, "shared": shared,
                "aliases": {("embed" if k == "embed.weight" else "head"): [a.tensor for a in self.params[k].aliases]
                            for k in SHARED if k in self.params and self.params[k].aliases}}

    def _parts(self) -> set[str]:
        """The parts (``main``, ``mtp.K``) that have at least one planned parameter."""
        return set(map(_PART, self.params.values()))

    def to_json(self) -> dict[str, Any]:
        ck = self.checkpoint
        return {"path": self.path, "ok": self.ok, "tensors": len(ck.tensors), "bytes": ck.total_bytes,
                "files": len(ck.files), "naming": self.naming, "num_hidden_layers": self.cfg.n_layers,
                "mtp_layers": len({p for p in self._parts() if p.startswith("mtp.")}),
                "unmapped": self.unmapped, "missing": self.missing, "errors": self.errors,
                "mtp": self.mtp_report(), "quant": self.quant_report(), "explained": self.explained,
                "warnings": self.warnings}


def build_plan(path: str, *, cfg: DSV4Config | None = None, include_mtp: bool = True,
               checkpoint: Checkpoint | None = None) -> LoadPlan:
    """Plan the load of the artifact at ``path``. Artifact problems are collected, not raised."""
    with gc_paused():
        return _build(path, cfg, include_mtp, checkpoint)


def _build(path: str, cfg: DSV4Config | None, include_mtp: bool, checkpoint: Checkpoint | None) -> LoadPlan:
    ck = checkpoint if checkpoint is not None else scan_checkpoint(path)
    cfg = cfg if cfg is not None else load_config(path)
    plan = LoadPlan(path=path, cfg=cfg, checkpoint=ck, include_mtp=include_mtp)
    batches, loose, conventions = _resolve(plan)
    account(plan, expected_params(cfg, include_mtp=include_mtp), batches, loose)
    _check_mtp(plan)
    plan.naming = _naming(conventions)
    from .config_check import quant_config_disagreements
    plan.warnings += quant_config_disagreements(plan)
    return plan


# ---- steps ----
def _resolve(plan: LoadPlan) -> tuple[list[Found], list[tuple[int, str, AnySource]], set[str] | None]:
    """Resolve every tensor: batches renamed in bulk, ``(position, canonical, source)`` for the rest, and the
    conventions common to all names. Problems are recorded in tensor order."""
    infos = list(plan.checkpoint.tensors.values())
    resolver = Resolver(plan.cfg)
    batches, rest = resolve_names(resolver, list(plan.checkpoint.tensors))
    found: list[Found] = []
    loose: list[tuple[int, str, AnySource]] = []
    notes: list[tuple[int, list, object]] = []          # (position, plan list, entry)
    common: set[str] | None = None
    for b in batches:
        convs = set(b.rule.conventions)
        common = convs if common is None else (common & convs)
        group = list(map(infos.__getitem__, b.index))
        if b.canonical is None:
            notes += [(i, plan.explained, {"name": t.name, "file": t.file, "reason": b.rule.reason})
                      for i, t in zip(b.index, group)]
            continue
        found.append(Found(b.canonical, group, b.index, b.text))
    for i in rest:
        info = infos[i]
        try:
            res = resolver.resolve(info.name, info.shape)
        except DSV4Error as e:
            notes.append((i, plan.errors, f"{info.file}: {e}"))
            continue
        if res.rule is None:
            notes.append((i, plan.unmapped, {"name": info.name, "file": info.file, "reason": res.problem}))
            continue
        convs = set(res.rule.conventions)
        common = convs if common is None else (common & convs)
        if res.rule.target is None:
            notes.append((i, plan.explained, {"name": info.name, "file": info.file, "reason": res.rule.reason}))
            continue
        if res.problem:
            notes.append((i, plan.errors, f"{info.file}: {info.name}: {res.problem}"))
            continue
        loose += [(i, p.canonical, info if not p.ops and p.shape == info.shape else
                   Source(info.name, info.file, info.dtype, p.shape, p.ops)) for p in res.pieces]
    notes.sort(key=itemgetter(0))
    for _, where, entry in notes:
        where.append(entry)
    return found, loose, common


def _check_mtp(plan: LoadPlan) -> None:
    cfg = plan.cfg
    if not plan.include_mtp or cfg.n_mtp_layers == 0:
        return
    has_mtp = any(pp.spec.part.startswith("mtp.") for pp in reversed(plan.params.values()))   # MTP comes last
    mtp_unmapped = [u for u in plan.unmapped if u["name"].startswith(("mtp.", "model.mtp."))]
    mtp_missing = [m for m in plan.missing if m["param"].startswith("mtp.")]
    if not has_mtp and not mtp_unmapped and mtp_missing and not any(m["reason"].startswith("MTP layer")
                                                                    for m in plan.unmapped):
        plan.missing = [m for m in plan.missing if not m["param"].startswith("mtp.")]
        plan.missing.append({"param": "mtp.*", "reason": _TRANSFORMERS_HINT.format(n=cfg.n_mtp_layers)})
        return
    if mtp_unmapped:
        names = sorted({u["name"] for u in mtp_unmapped})
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        plan.errors.append(f"refusing the mtp.* block: it is shaped differently from a DeepSeek-V4 MTP layer "
                           f"(unknown names: {shown}); a DSpark drafter (markov_head, no enorm/hnorm) is not "
                           "supported by method=mtp")


def _naming(common: set[str] | None) -> str:
    if not common:
        return "mixed" if common is not None else "upstream"
    return next(c for c in CONVENTIONS if c in common)
