"""The load plan: before reading one weight, know where every parameter comes from and in what format.

Strict accounting: every expected parameter is filled exactly once, every tensor on disk is used or
explained by a rule with a written reason. Shared ``embed``/``head`` are routed to the MTP draft explicitly;
copies of them inside ``mtp.K`` are aliases, checked for shape here and for value when loading.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import Checkpoint, scan_checkpoint
from ..config import DSV4Config, load_config
from ..errors import DSV4Error, PlanError
from ..naming import CONVENTIONS, Resolver
from ..naming.rule import ROLE_SUFFIXES
from ..quant.detect import FLOAT_DTYPES, ModuleQuant, TensorMeta, classify_module
from .expected import FLOAT, INDEX, LINEAR, ParamSpec, expected_params

__all__ = ["Source", "ParamPlan", "LoadPlan", "build_plan"]

_ROLES = frozenset(ROLE_SUFFIXES)
_MTP = re.compile(r"^mtp\.(\d+)\.")
SHARED = ("embed.weight", "head")   # plain tensor / linear module shared by the main model and the MTP draft
_TRANSFORMERS_HINT = ("the artifact has no mtp.* tensors although config.json declares num_nextn_predict_layers={n}; "
                      "this happens when a checkpoint is saved through transformers (which drops mtp.*) or "
                      "llm-compressor; restore the block from the original release or pass --no-mtp")


@dataclass(frozen=True, slots=True)
class Source:
    """One on-disk tensor (or a slice of it, after ``ops``) that fills a parameter role."""

    tensor: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    ops: tuple[tuple, ...] = ()


@dataclass
class ParamPlan:
    """How one expected parameter is filled: its scheme (linears) and the source of each role."""

    spec: ParamSpec
    roles: dict[str, Source]
    quant: ModuleQuant | None = None
    aliases: tuple[Source, ...] = ()      # extra copies of a shared tensor: compared when loading

    @property
    def scheme(self) -> str:
        return self.quant.scheme if self.quant else ""


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
        for pp in self.params.values():
            if pp.quant is not None and pp.spec.group not in ("head",):
                seen[pp.spec.part][pp.spec.group].add(pp.quant.scheme)
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
        complete = bool(parts) and not missing_mtp and all(
            any(pp.spec.part == p for pp in self.params.values()) for p in parts) and not any(
            "mtp" in e for e in self.errors)
        return {"complete": complete, "layers": n, "shared": shared,
                "aliases": {("embed" if k == "embed.weight" else "head"): [a.tensor for a in self.params[k].aliases]
                            for k in SHARED if k in self.params and self.params[k].aliases}}

    def to_json(self) -> dict[str, Any]:
        ck = self.checkpoint
        return {"path": self.path, "ok": self.ok, "tensors": len(ck.tensors), "bytes": ck.total_bytes,
                "files": len(ck.files), "naming": self.naming, "num_hidden_layers": self.cfg.n_layers,
                "mtp_layers": len({pp.spec.part for pp in self.params.values() if pp.spec.part.startswith("mtp.")}),
                "unmapped": self.unmapped, "missing": self.missing, "errors": self.errors,
                "mtp": self.mtp_report(), "quant": self.quant_report(), "explained": self.explained,
                "warnings": self.warnings}


def build_plan(path: str, *, cfg: DSV4Config | None = None, include_mtp: bool = True,
               checkpoint: Checkpoint | None = None) -> LoadPlan:
    """Plan the load of the artifact at ``path``. Artifact problems are collected, not raised."""
    ck = checkpoint if checkpoint is not None else scan_checkpoint(path)
    cfg = cfg if cfg is not None else load_config(path)
    plan = LoadPlan(path=path, cfg=cfg, checkpoint=ck, include_mtp=include_mtp)
    found, conventions = _resolve(plan)
    specs = expected_params(cfg, include_mtp=include_mtp)
    _account(plan, specs, found)
    _check_mtp(plan)
    plan.naming = _naming(conventions)
    from ..quant.config_check import quant_config_disagreements
    plan.warnings += quant_config_disagreements(plan)
    return plan


# ---- steps ----
def _resolve(plan: LoadPlan) -> tuple[dict[str, list[Source]], set[str] | None]:
    """Resolve every tensor; returns canonical name -> sources, and the conventions common to all names."""
    resolver = Resolver(plan.cfg)
    found: dict[str, list[Source]] = defaultdict(list)
    common: set[str] | None = None
    for info in plan.checkpoint.tensors.values():
        try:
            res = resolver.resolve(info.name, info.shape)
        except DSV4Error as e:
            plan.errors.append(f"{info.file}: {e}")
            continue
        if res.rule is None:
            plan.unmapped.append({"name": info.name, "file": info.file, "reason": res.problem})
            continue
        convs = set(res.rule.conventions)
        common = convs if common is None else (common & convs)
        if res.rule.target is None:
            plan.explained.append({"name": info.name, "file": info.file, "reason": res.rule.reason})
            continue
        if res.problem:
            plan.errors.append(f"{info.file}: {info.name}: {res.problem}")
            continue
        for p in res.pieces:
            found[p.canonical].append(Source(info.name, info.file, info.dtype, p.shape, p.ops))
    return found, common


def _account(plan: LoadPlan, specs: list[ParamSpec], found: dict[str, list[Source]]) -> None:
    cfg = plan.cfg
    plain = {s.name: s for s in specs if s.kind != LINEAR}
    linear = {s.name: s for s in specs if s.kind == LINEAR}
    by_module: dict[str, dict[str, list[Source]]] = defaultdict(dict)
    for canon, sources in found.items():
        if canon in plain:
            continue
        module, _, role = canon.rpartition(".")
        if role in _ROLES and module in linear:
            by_module[module][role] = sources
            continue
        _unexpected(plan, canon, sources)
    for name, spec in plain.items():
        sources = found.get(name)
        if not sources:
            plan.missing.append({"param": name, "reason": _missing_reason(name)})
            continue
        primary, aliases = _pick_primary(plan, name, sources)
        if primary is None:
            continue
        if _check_plain(plan, spec, primary) and all(_check_plain(plan, spec, a) for a in aliases):
            plan.params[name] = ParamPlan(spec, {"tensor": primary}, None, tuple(aliases))
    classified: dict[tuple, ModuleQuant] = {}      # same dtypes/shapes -> same scheme (34k experts, few kinds)
    for module, spec in linear.items():
        roles = by_module.get(module)
        if not roles:
            plan.missing.append({"param": f"{module}.weight", "reason": _missing_reason(module)})
            continue
        chosen: dict[str, Source] = {}
        aliases: list[Source] = []
        for role, sources in roles.items():
            primary, extra = _pick_primary(plan, f"{module}.{role}", sources)
            if primary is None:
                break
            chosen[role] = primary
            aliases += extra
        else:
            key = (spec.shape, tuple(sorted((r, s.dtype, s.shape) for r, s in chosen.items())))
            q = classified.get(key)
            if q is None:
                metas = {r: TensorMeta(s.tensor, s.dtype, s.shape, s.file) for r, s in chosen.items()}
                try:
                    q = classified[key] = classify_module(module, metas, *spec.shape)
                except DSV4Error as e:
                    plan.errors.append(str(e))
                    continue
            for a in aliases:
                if a.shape != chosen["weight"].shape:
                    plan.errors.append(f"{a.file}: {a.tensor}: alias of {chosen['weight'].tensor} with a "
                                       f"conflicting shape: expected {list(chosen['weight'].shape)}, found {list(a.shape)}")
            plan.params[module] = ParamPlan(spec, {r: chosen[s] for r, s in q.roles.items()}, q, tuple(aliases))


def _pick_primary(plan: LoadPlan, name: str, sources: list[Source]) -> tuple[Source | None, list[Source]]:
    """One source per role. Several are only allowed for the shared embed/head (aliases, top level first)."""
    if len(sources) == 1:
        return sources[0], []
    base = name.rsplit(".", 1)[0] if name.startswith("head.") else name
    if base not in SHARED:
        plan.errors.append(f"{name}: filled by {len(sources)} tensors: " +
                           ", ".join(f"{s.tensor} ({s.file})" for s in sources) + "; expected exactly one")
        return None, []
    ordered = sorted(sources, key=lambda s: (s.tensor.startswith(("mtp.", "model.layers.")), s.tensor))
    return ordered[0], ordered[1:]


def _check_plain(plan: LoadPlan, spec: ParamSpec, src: Source) -> bool:
    where = f"{src.file}: {src.tensor}"
    if src.shape != spec.shape:
        plan.errors.append(f"{where}: expected shape {list(spec.shape)} for {spec.name}, found {list(src.shape)}")
        return False
    if spec.kind == INDEX and src.dtype not in ("I64", "I32"):
        plan.errors.append(f"{where}: expected dtype I64 or I32 (expert ids), found {src.dtype}")
        return False
    if spec.kind == FLOAT and src.dtype not in FLOAT_DTYPES:
        plan.errors.append(f"{where}: expected a float dtype (BF16/F16/F32), found {src.dtype}")
        return False
    return True


def _unexpected(plan: LoadPlan, canon: str, sources: list[Source]) -> None:
    """A tensor maps to a canonical name the config does not have: explained, or unmapped."""
    cfg = plan.cfg
    m = _MTP.match(canon)
    for s in sources:
        if m and not plan.include_mtp:
            plan.explained.append({"name": s.tensor, "file": s.file, "reason": "MTP block not loaded (--no-mtp)"})
            continue
        lm = re.match(r"^layers\.(\d+)\.ffn\.gate\.bias$", canon)
        if lm and cfg.is_hash_layer(int(lm.group(1))):
            plan.explained.append({"name": s.tensor, "file": s.file, "reason": "hash layers route by tid2eid; "
                                   "a saved selection bias is never read (transformers creates one per layer)"})
            continue
        if m and int(m.group(1)) >= cfg.n_mtp_layers:
            reason = (f"MTP layer {m.group(1)} but config declares num_nextn_predict_layers={cfg.n_mtp_layers} "
                      "(a DSpark-style multi-stage drafter is not a method=mtp block)")
        else:
            reason = f"maps to {canon}, which this config does not have (layer type, count or shape mismatch)"
        plan.unmapped.append({"name": s.tensor, "file": s.file, "reason": reason})


def _missing_reason(name: str) -> str:
    if name.startswith("mtp."):
        return "MTP parameter not found under any known spelling"
    return "not found under any known spelling"


def _check_mtp(plan: LoadPlan) -> None:
    cfg = plan.cfg
    if not plan.include_mtp or cfg.n_mtp_layers == 0:
        return
    has_mtp = any(pp.spec.part.startswith("mtp.") for pp in plan.params.values())
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
