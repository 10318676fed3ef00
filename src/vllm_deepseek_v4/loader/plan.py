"""The load plan: before reading one weight, know where every parameter comes from and in what format.

Strict accounting: every expected parameter is filled exactly once, every tensor on disk is used or
explained by a rule with a written reason. Shared ``embed``/``head`` are routed to the MTP draft explicitly;
copies of them inside ``mtp.K`` are aliases, checked for shape here and for value when loading.

Steps: scan the headers, resolve every name (``naming``), account for every parameter (``account``), check
the MTP block as a whole, cross-check ``quantization_config`` (``config_check``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Iterable

from ..checkpoint import Checkpoint, TensorInfo, scan_checkpoint
from ..checkpoint.format import getter
from ..checkpoint.scan import gc_paused
from ..config import DSV4Config, load_config
from ..errors import PlanError
from ..naming import CONVENTIONS, Resolver, Rule
from .account import SHARED, Found, account
from .config_check import config_contradictions, count_contradictions, quant_config_disagreements
from .expected import ParamSpec, expected_params
from .records import (FOREIGN_MTP, MTP_DROPPED, MTP_ONLY, NAMING, QUANT, UNMAPPED, AnySource, ParamPlan,
                      Problem, Source, part_of)

__all__ = ["Source", "ParamPlan", "Problem", "LoadPlan", "build_plan"]

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
    errors: list[Problem] = field(default_factory=list)
    unmapped: list[Problem] = field(default_factory=list)      # tensors on disk that fill nothing
    missing: list[Problem] = field(default_factory=list)       # parameters nothing fills
    explained: list[dict[str, str]] = field(default_factory=list)   # {name, file, reason}: not loaded on purpose
    warnings: list[str] = field(default_factory=list)
    naming: str = "upstream"

    def add(self, problems: Iterable[Problem]) -> None:
        """File each problem under its report list (``Problem.report``), keeping their order."""
        for p in problems:
            getattr(self, p.report).append(p)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.errors)

    def all_problems(self) -> list[Problem]:
        return self.errors + self.unmapped + self.missing

    def problems(self) -> list[str]:
        """One line per problem, each naming the tensor (and file) or parameter."""
        return [p.line for p in self.all_problems()]

    def mtp_problems(self) -> list[str]:
        """The lines of ``problems()`` about the MTP block."""
        return [p.line for p in self.all_problems() if p.part != "main"]

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise PlanError(self.problems(), file=self.path)

    def quant_report(self) -> dict[str, dict[str, str]]:
        """Scheme per quant group, separately for the trunk and for each MTP layer."""
        seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        linears = list(filter(getter(ParamPlan, "quant"), self.params.values()))
        specs, quants = list(map(getter(ParamPlan, "spec"), linears)), list(map(getter(ParamPlan, "quant"), linears))
        quant_of = dict(zip(map(id, quants), quants))       # the few schemes 35k parameters share
        for part, group, q in set(zip(map(getter(ParamSpec, "part"), specs), map(getter(ParamSpec, "group"), specs),
                                      map(id, quants))):
            if group != "head":
                seen[part][group].add(quant_of[q].scheme)
        return {part: {g: (s.pop() if len(s) == 1 else "mixed:" + "+".join(sorted(s)))
                       for g, s in sorted(groups.items())}
                for part, groups in sorted(seen.items(), key=lambda kv: (kv[0] != "main", kv[0]))}

    def one_scheme_problems(self, report: dict[str, dict[str, str]] | None = None) -> list[Problem]:
        """A quant group whose modules use several schemes, one problem per group and part. The plan is per
        module (``dsv4 check-vllm`` says whether vLLM's own classes load such a mix), but the portable engine
        builds every linear of a group in one scheme (``quant/groups.py``): ``verify`` and ``load_model`` refuse
        it; ``inspect`` lists it as a warning. ``report``: ``quant_report()``, if the caller has it already."""
        mixed = {(part, g) for part, groups in (report or self.quant_report()).items() for g, s in groups.items()
                 if s.startswith("mixed:")}
        modules: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for name, pp in self.params.items() if mixed else ():
            if (pp.spec.part, pp.spec.group) in mixed:
                modules[pp.spec.part, pp.spec.group][pp.scheme].append(name)
        out = []
        for (part, group), by_scheme in modules.items():
            # name the rarer scheme's first module: the likelier odd one out
            ranked = sorted(by_scheme.items(), key=lambda kv: (len(kv[1]), kv[0]))
            (few, odd), (most, usual) = ranked[0], ranked[-1]
            src = next(iter(self.params[odd[0]].roles.values()))
            out.append(Problem(QUANT, part, src.tensor, src.file,
                               f"{part} quant group '{group}' mixes {' and '.join(sorted(by_scheme))}: "
                               f"{odd[0]} is {few} ({len(odd)} module(s)), {usual[0]} is {most} "
                               f"({len(usual)}); the portable engine builds every linear of a group in one "
                               "scheme (dsv4 check-vllm says whether vLLM's own classes load it)"))
        return out

    def mtp_report(self, planned: set[str] | None = None) -> dict[str, Any]:
        """Whether the MTP draft is complete, and where its shared embed/head come from (``planned``: the
        parts that have parameters, if known)."""
        n = self.cfg.n_mtp_layers if self.include_mtp else 0
        planned = self._parts() if planned is None else planned
        # no set of the n declared parts: n may be a bogus 10^6 (reported by the plan)
        complete = (0 < n <= len(planned) and all(f"mtp.{k}" in planned for k in range(n))
                    and not any(p.part != "main" for p in self.missing + self.errors))
        shared = {}
        for key, label in (("embed.weight", "embed"), ("head", "head")):
            pp = self.params.get(key)
            shared[label] = pp.roles["weight" if key == "head" else "tensor"].tensor if pp else None
        return {"complete": complete, "layers": n, "shared": shared,
                "aliases": {("embed" if k == "embed.weight" else "head"): [a.tensor for a in self.params[k].aliases]
                            for k in SHARED if k in self.params and self.params[k].aliases}}

    def _parts(self) -> set[str]:
        """The parts (``main``, ``mtp.K``) that have at least one planned parameter."""
        return set(map(getter(ParamSpec, "part"), map(getter(ParamPlan, "spec"), self.params.values())))

    def to_json(self) -> dict[str, Any]:
        ck, planned, quant = self.checkpoint, self._parts(), self.quant_report()
        return {"path": self.path, "ok": self.ok, "tensors": len(ck.tensors), "bytes": ck.total_bytes,
                "files": len(ck.files), "naming": self.naming, "num_hidden_layers": self.cfg.n_layers,
                "mtp_layers": len(planned - {"main"}),
                "unmapped": [p.as_json() for p in self.unmapped], "missing": [p.as_json() for p in self.missing],
                "errors": [p.as_json() for p in self.errors], "mtp": self.mtp_report(planned),
                "quant": quant, "explained": self.explained,
                "warnings": self.warnings + [p.text for p in self.one_scheme_problems(quant)]}


def build_plan(path: str, *, cfg: DSV4Config | None = None, include_mtp: bool = True,
               checkpoint: Checkpoint | None = None) -> LoadPlan:
    """Plan the load of the artifact at ``path``. Artifact problems are collected, not raised."""
    with gc_paused():
        ck = checkpoint if checkpoint is not None else scan_checkpoint(path)
        cfg = cfg if cfg is not None else load_config(path)
        found, problems, explained, conventions = _resolve(ck, cfg)
        # a count above the tensors on disk is one error, and the parameters are built only as far as the tensors
        counts, contradicted = count_contradictions(cfg, found, include_mtp)
        books = account(expected_params(cfg, include_mtp=include_mtp, counts=counts), found, cfg, include_mtp)
        plan = LoadPlan(path=path, cfg=cfg, checkpoint=ck, include_mtp=include_mtp, params=books.params,
                        explained=explained + books.explained, naming=_naming(conventions))
        problems = contradicted + problems + books.problems
        plan.add(config_contradictions(cfg, found) + problems if problems else [])
        _check_mtp(plan)
        plan.warnings += quant_config_disagreements(plan)
        return plan


# ---- steps ----
def _resolve(ck: Checkpoint, cfg: DSV4Config
             ) -> tuple[list[Found], list[Problem], list[dict[str, str]], set[str] | None]:
    """Resolve every tensor name: the columns of renamed tensors, the naming problems and the tensors dropped
    on purpose (each in tensor order), and the naming conventions common to all resolved names."""
    infos = list(ck.tensors.values())
    res = Resolver(cfg).resolve_names(list(ck.tensors), lambda i: infos[i].shape)
    rules: list[Rule] = [b.rule for b in res.batches] + [r for _, r, _ in res.fused] + [r for _, r, _ in res.misplaced]
    found, dropped = [], []
    for b in res.batches:
        sources = list(map(infos.__getitem__, b.index))
        if b.canonical is None:
            dropped += [(i, {"name": t.name, "file": t.file, "reason": b.rule.reason})
                        for i, t in zip(b.index, sources)]
        else:
            found.append(Found(b.canonical, sources, b.index, b.text))
    if res.fused:
        pieces = [(i, p.canonical, _source(infos[i], p.shape, p.ops)) for i, _, ps in res.fused for p in ps]
        canonical = [c for _, c, _ in pieces]
        found.append(Found(canonical, [s for _, _, s in pieces], [i for i, _, _ in pieces], "\n".join(canonical)))

    def problem(i: int, kind: str, part: str, reason: str) -> tuple[int, Problem]:
        return i, Problem(kind, part, infos[i].name, infos[i].file, reason)
    problems = ([problem(i, UNMAPPED, part_of(infos[i].name), "matches no naming rule") for i in res.unmapped]
                + [problem(i, NAMING, part_of(infos[i].name), e.reason) for i, e in res.refused]
                + [problem(i, MTP_ONLY, "main", why) for i, _, why in res.misplaced])
    common = set.intersection(*(set(r.conventions) for r in rules)) if rules else None
    return (found, [p for _, p in sorted(problems, key=itemgetter(0))],
            [e for _, e in sorted(dropped, key=itemgetter(0))], common)


def _source(info: TensorInfo, shape: tuple[int, ...], ops: tuple[tuple, ...]) -> AnySource:
    """A piece of tensor ``info``: the tensor itself when the piece is all of it."""
    if not ops and shape == info.shape:
        return info
    return Source(tensor=info.name, dtype=info.dtype, shape=shape, file=info.file, ops=ops)


def _check_mtp(plan: LoadPlan) -> None:
    """The MTP block as a whole: dropped by a transformers save, or shaped like something else."""
    cfg = plan.cfg
    if not plan.include_mtp or cfg.n_mtp_layers == 0:
        return
    has_mtp = any(pp.spec.part != "main" for pp in reversed(plan.params.values()))   # MTP comes last
    placed_nowhere = [p for p in plan.unmapped if p.part != "main"]
    mtp_missing = [p for p in plan.missing if p.part != "main"]
    if not has_mtp and not placed_nowhere and mtp_missing:
        plan.missing = [p for p in plan.missing if p.part == "main"]
        plan.missing.append(Problem(MTP_DROPPED, "mtp.*", "mtp.*", "", _TRANSFORMERS_HINT.format(n=cfg.n_mtp_layers)))
        return
    if placed_nowhere:
        names = sorted({p.tensor for p in placed_nowhere})
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        plan.errors.append(Problem(FOREIGN_MTP, "mtp.*", "", "", "refusing the mtp.* block: it is shaped differently "
                                   f"from a DeepSeek-V4 MTP layer (unknown names: {shown}); a DSpark drafter "
                                   "(markov_head, no enorm/hnorm) is not supported by method=mtp"))


def _naming(common: set[str] | None) -> str:
    if not common:
        return "mixed" if common is not None else "upstream"
    return next(c for c in CONVENTIONS if c in common)
