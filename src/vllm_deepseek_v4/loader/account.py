"""Strict accounting: every expected parameter filled exactly once, every tensor on disk used or explained.

Resolved tensors arrive as columns (``Found``): the names one naming rule renamed together. A column whose
names are all one role of expected linear modules (``layers.N.ffn.experts.E.w1.scale``) stays a column; any
other name is sorted on its own -- a plain parameter, a role of a linear module (such roles are gathered
into columns too), or a name the config does not have. The modules are then partitioned by the columns
that fill them (``cells.cells``); in a cell every module has the same roles, so each distinct (logical shape,
role dtypes and shapes) is classified once: Flash's 34k expert modules are a handful of kinds. A cell
where one role comes from two columns is settled module by module: the shared embed/head keep their
top-level copy and check the others as aliases, any other parameter filled twice is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from itertools import chain, compress, repeat
from operator import itemgetter, not_
from typing import Iterable

from ..checkpoint.format import TensorInfo, getter
from ..config import DSV4Config
from ..errors import DSV4Error
from ..naming.rule import ROLE_SUFFIXES
from ..quant.detect import FLOAT_DTYPES, ModuleQuant, TensorMeta, classify_module
from .cells import Column, cells
from .expected import FLOAT, INDEX, LINEAR, ParamSpec
from .records import (ALIAS_SHAPE, DTYPE, DUPLICATE, EXTRA_MTP_LAYER, MISSING, QUANT, SHAPE, UNEXPECTED,
                      AnySource, ParamPlan, Problem, part_of)

__all__ = ["Found", "Accounting", "account", "SHARED"]

SHARED = ("embed.weight", "head")   # plain tensor / linear module shared by the main model and the MTP draft
_ROLES = frozenset(ROLE_SUFFIXES)
# Builds a ParamPlan from one tuple without the generated ``__new__``: 35k per Flash plan.
_param_plan = partial(tuple.__new__, ParamPlan)


@dataclass(slots=True)
class Found:
    """Tensors renamed together: ``sources[i]`` fills canonical name ``canonical[i]``; ``index[i]`` is its
    position in the checkpoint."""

    canonical: list[str]
    sources: list[AnySource]
    index: list[int]
    text: str                   # "\n".join(canonical)


@dataclass(slots=True)
class Accounting:
    """What ``account`` made of the tensors: planned parameters, problems, tensors not loaded on purpose."""

    params: dict[str, ParamPlan] = field(default_factory=dict)     # plain ones, then linears; spec order each
    problems: list[Problem] = field(default_factory=list)
    explained: list[dict[str, str]] = field(default_factory=list)  # {name, file, reason}


class _Kinds:
    """Schemes by (logical shape, sorted (role, dtype, shape)); equal schemes share one ``ModuleQuant``."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, ModuleQuant | DSV4Error] = {}
        self._same: dict[tuple, ModuleQuant] = {}

    def classify(self, module: str, spec: ParamSpec, roles: dict[str, AnySource]) -> ModuleQuant | DSV4Error:
        """The scheme of ``module`` (roles in tensor order), or why it has none."""
        key = (spec.shape, tuple(sorted((r, s.dtype, s.shape) for r, s in roles.items())))
        got = self._by_key.get(key)
        if got is None:
            metas = {r: TensorMeta(s.tensor, s.dtype, s.shape, s.file) for r, s in roles.items()}
            try:
                q = classify_module(module, metas, *spec.shape)
            except DSV4Error as e:
                return e                        # not kept: the message names this module's tensors
            got = self._by_key[key] = self._same.setdefault((q.scheme, q.variant, tuple(q.roles.items())), q)
        return got


def account(specs: list[ParamSpec], found: list[Found], cfg: DSV4Config, include_mtp: bool) -> Accounting:
    """Plan every parameter of ``specs`` from the ``found`` tensors; report what does not fit."""
    is_linear = list(map(LINEAR.__eq__, map(getter(ParamSpec, "kind"), specs)))
    by_name = list(zip(map(getter(ParamSpec, "name"), specs), specs))
    linear = dict(compress(by_name, is_linear))
    plain = dict(compress(by_name, map(not_, is_linear)))
    columns: list[Column] = []
    loose: list[tuple[int, str, AnySource]] = []            # (position, canonical, source), sorted one by one
    as_column = _Columns(linear, plain)
    for f in found:
        column = as_column(f)
        if column is None:
            loose += zip(f.index, f.canonical, f.sources)
        else:
            columns.append(column)
    loose.sort(key=itemgetter(0))
    plain_found: dict[str, list[AnySource]] = {}
    roles: dict[str, list[tuple[str, int, AnySource]]] = {}  # role -> (module, position, source)
    out = Accounting()
    for pos, canon, src in loose:
        module, _, role = canon.rpartition(".")
        if canon in plain:
            plain_found.setdefault(canon, []).append(src)
        elif role in _ROLES and module in linear:
            roles.setdefault(role, []).append((module, pos, src))
        else:
            _unexpected(canon, src, cfg, include_mtp, out)
    columns += _loose_columns(roles, linear)
    _plan_plain(plain, plain_found, out)
    _plan_linear(linear, columns, out)
    return out


class _Columns:
    """Takes a batch of found tensors as a column when its names are all one role of expected linear modules,
    each once. A module list is parsed once: a module's weight and scale batches list the same modules in
    the same order, and their columns share one list, spec list and set."""

    def __init__(self, linear: dict[str, ParamSpec], plain: dict[str, ParamSpec]) -> None:
        self.linear = linear
        # plain parameters named like a linear's role (none in DSv4) must not be taken into a column
        self.clash = {p for p in plain if p.rpartition(".")[2] in _ROLES and p.rpartition(".")[0] in linear}
        self._lists: dict[str, tuple[list[str], list[ParamSpec], frozenset[str]] | None] = {}

    def __call__(self, f: Found) -> Column | None:
        role = f.canonical[0].rpartition(".")[2] if f.canonical else ""
        end = "." + role
        # each "\n" ends one name: then every name ends with .role
        if role not in _ROLES or not f.text.endswith(end) or f.text.count(end + "\n") != len(f.canonical) - 1:
            return None
        if self.clash and not self.clash.isdisjoint(f.canonical):
            return None
        text = f.text.replace(end + "\n", "\n")[:-len(end)]
        if text not in self._lists:
            modules = text.split("\n")
            specs = list(map(self.linear.get, modules))
            members = frozenset(modules)
            ok = None not in specs and len(members) == len(modules)          # expected linears, each once
            self._lists[text] = (modules, specs, members) if ok else None
        got = self._lists[text]
        return None if got is None else Column(role, got[0], f.sources, f.index, got[1], got[2])


def _loose_columns(roles: dict[str, list[tuple[str, int, AnySource]]], linear: dict[str, ParamSpec]) -> list[Column]:
    """Roles found name by name as columns; a module met twice under one role starts another column."""
    out = []
    for role, items in roles.items():
        while items:
            seen, modules, sources, index, again = set(), [], [], [], []
            for module, pos, src in items:
                if module in seen:
                    again.append((module, pos, src))
                    continue
                seen.add(module)
                modules.append(module)
                sources.append(src)
                index.append(pos)
            out.append(Column(role, modules, sources, index, list(map(linear.__getitem__, modules)), frozenset(seen)))
            items = again
    return out


# ---- plain parameters ----
def _plan_plain(plain: dict[str, ParamSpec], found: dict[str, list[AnySource]], out: Accounting) -> None:
    for name, spec in plain.items():
        sources = found.get(name)
        if not sources:
            out.problems.append(_missing(name, spec))
            continue
        primary, aliases, problem = _pick_primary(name, spec.part, sources)
        for src in [primary, *aliases] if problem is None else ():
            problem = _check_plain(spec, src)
            if problem is not None:
                break
        if problem is None:
            out.params[name] = ParamPlan(spec, {"tensor": primary}, None, tuple(aliases))
        else:
            out.problems.append(problem)


def _check_plain(spec: ParamSpec, src: AnySource) -> Problem | None:
    if src.shape != spec.shape:
        return Problem(SHAPE, spec.part, src.tensor, src.file,
                       f"expected shape {list(spec.shape)} for {spec.name}, found {list(src.shape)}")
    if spec.kind == INDEX and src.dtype not in ("I64", "I32"):
        return Problem(DTYPE, spec.part, src.tensor, src.file,
                       f"expected dtype I64 or I32 (expert ids), found {src.dtype}")
    if spec.kind == FLOAT and src.dtype not in FLOAT_DTYPES:
        return Problem(DTYPE, spec.part, src.tensor, src.file,
                       f"expected a float dtype (BF16/F16/F32), found {src.dtype}")
    return None


def _pick_primary(name: str, part: str, sources: list[AnySource]
                  ) -> tuple[AnySource, list[AnySource], Problem | None]:
    """One source per role. Several are only allowed for the shared embed/head (aliases, top level first)."""
    if len(sources) == 1:
        return sources[0], [], None
    base = name.rsplit(".", 1)[0] if name.startswith("head.") else name
    if base not in SHARED:
        listed = ", ".join(f"{s.tensor} ({s.file})" for s in sources)
        return sources[0], [], Problem(DUPLICATE, part, name, "",
                                       f"filled by {len(sources)} tensors: {listed}; expected exactly one")
    ordered = sorted(sources, key=lambda s: (s.tensor.startswith(("mtp.", "model.layers.")), s.tensor))
    return ordered[0], ordered[1:], None


# ---- linear modules ----
def _plan_linear(linear: dict[str, ParamSpec], columns: list[Column], out: Accounting) -> None:
    made: dict[str, ParamPlan] = {}
    problems: list[tuple[str, Problem]] = []               # (module, problem): reported in parameter order
    kinds = _Kinds()
    covered = 0
    for modules, cols in cells(columns):
        covered += len(modules)
        if len({c.role for c in cols}) < len(cols):        # a role from two columns: module by module
            for module in modules:
                _plan_module(module, linear[module], [(c, c.positions([module])[0]) for c in cols], kinds, made,
                             problems)
        else:
            _plan_cell(modules, cols, linear, kinds, made, problems)
    if problems:
        order = dict(zip(linear, range(len(linear))))
        problems.sort(key=lambda mp: order[mp[0]])
    if covered < len(linear):                               # modules no tensor names at all
        seen = set(chain.from_iterable(c.modules for c in columns))
        problems += [(m, _missing(f"{m}.weight", spec)) for m, spec in linear.items() if m not in seen]
    out.problems += [p for _, p in problems]
    planned = list(linear) if len(made) == len(linear) else list(filter(made.__contains__, linear))
    out.params.update(zip(planned, map(made.__getitem__, planned)))          # in parameter order


def _plan_cell(modules: list[str], cols: list[Column], linear: dict[str, ParamSpec], kinds: _Kinds,
               made: dict[str, ParamPlan], problems: list[tuple[str, Problem]]) -> None:
    """Plan modules that all have the roles of ``cols`` (one column each), each distinct kind classified once."""
    sources = [c.sources if c.modules is modules or c.modules == modules else
               list(map(c.sources.__getitem__, c.positions(modules))) for c in cols]
    specs = cols[0].specs if modules is cols[0].modules else list(map(linear.__getitem__, modules))
    roles = [c.role for c in cols]
    # a module's kind: its logical shape, then the dtype and shape of each role (from a TensorInfo or a
    # Source, which hold them at the same positions); one flat tuple, hashed and compared per module
    dtype, shape = getter(TensorInfo, "dtype"), getter(TensorInfo, "shape")
    keys = list(zip(map(getter(ParamSpec, "shape"), specs),
                    *chain.from_iterable((map(dtype, col), map(shape, col)) for col in sources)))
    scheme_of_kind = {key: kinds.classify(modules[i], specs[i], {r: col[i] for r, col in zip(roles, sources)})
                      for key, i in dict(zip(keys, range(len(modules)))).items()}     # one module of each kind
    if len(scheme_of_kind) == 1:                           # the usual case: one kind fills the cell
        scheme: Iterable[ModuleQuant | DSV4Error] = repeat(next(iter(scheme_of_kind.values())))
    else:
        scheme = list(map(scheme_of_kind.__getitem__, keys))
    # modules are planned alike when their schemes read the same on-disk suffixes (fp8 and mxfp4 both read
    # weight and scale); a kind that fits no scheme reports each of its modules
    alike = {id(q): _suffixes(q) for q in scheme_of_kind.values()}
    groups = set(alike.values())
    for suffixes in groups:
        pick = None if len(groups) == 1 else [i for i, q in enumerate(scheme) if alike[id(q)] == suffixes]
        picked = (lambda xs: xs) if pick is None else (lambda xs: list(map(xs.__getitem__, pick)))
        if suffixes is None:
            problems += [(modules[i], _quant_problem(modules[i], specs[i], cols, sources, i, kinds))
                         for i in (range(len(modules)) if pick is None else pick)]
            continue
        by_role = dict(zip(roles, map(picked, sources)))
        dicts = _role_dicts(tuple(r for r, _ in suffixes), [by_role[sfx] for _, sfx in suffixes])
        made.update(zip(picked(modules), map(_param_plan, zip(picked(specs), dicts, picked(scheme), repeat(())))))


def _suffixes(q: ModuleQuant | DSV4Error) -> tuple[tuple[str, str], ...] | None:
    """(canonical role, on-disk suffix) pairs a scheme reads; None for a module that fits no scheme."""
    return None if isinstance(q, DSV4Error) else tuple(q.roles.items())


def _role_dicts(roles: tuple[str, ...], cols: list[list[AnySource]]) -> list[dict[str, AnySource]]:
    """``{roles[j]: cols[j][i]}`` for every i; one or two roles (most schemes) as dict displays, 3x faster."""
    if len(roles) == 1:
        (r,), (col,) = roles, cols
        return [{r: a} for a in col]
    if len(roles) == 2:
        r1, r2 = roles
        return [{r1: a, r2: b} for a, b in zip(*cols)]
    return list(map(dict, map(zip, repeat(roles), zip(*cols))))


def _quant_problem(module: str, spec: ParamSpec, cols: list[Column], sources: list[list[AnySource]], i: int,
                   kinds: _Kinds) -> Problem:
    """Why module ``i`` of a cell has no scheme, its roles passed in tensor order (as read from the checkpoint)."""
    order = sorted(range(len(cols)), key=lambda j: cols[j].index[cols[j].positions([module])[0]])
    e = kinds.classify(module, spec, {cols[j].role: sources[j][i] for j in order})
    assert isinstance(e, DSV4Error), f"{module}: classified as bad and as good"
    return Problem(QUANT, spec.part, e.tensor or module, e.file or "", e.reason)


def _plan_module(module: str, spec: ParamSpec, at: list[tuple[Column, int]], kinds: _Kinds,
                 made: dict[str, ParamPlan], problems: list[tuple[str, Problem]]) -> None:
    """One module whose roles come from several columns (``at``: each column and the module's place in it)."""
    by_role: dict[str, list[AnySource]] = {}
    for col, k in sorted(at, key=lambda ck: ck[0].index[ck[1]]):        # tensor order
        by_role.setdefault(col.role, []).append(col.sources[k])
    chosen: dict[str, AnySource] = {}
    aliases: list[tuple[AnySource, AnySource]] = []          # (alias, the primary it copies)
    for role, sources in by_role.items():
        primary, extra, problem = _pick_primary(f"{module}.{role}", spec.part, sources)
        if problem is not None:
            problems.append((module, problem))
            return
        chosen[role] = primary
        aliases += [(a, primary) for a in extra]
    q = kinds.classify(module, spec, chosen)
    if isinstance(q, DSV4Error):
        problems.append((module, Problem(QUANT, spec.part, q.tensor or module, q.file or "", q.reason)))
        return
    for a, primary in aliases:
        if a.shape != primary.shape:
            problems.append((module, Problem(ALIAS_SHAPE, part_of(a.tensor), a.tensor, a.file,
                                             f"alias of {primary.tensor} with a conflicting shape: expected "
                                             f"{list(primary.shape)}, found {list(a.shape)}")))
    made[module] = ParamPlan(spec, {r: chosen[s] for r, s in q.roles.items()}, q, tuple(a for a, _ in aliases))


# ---- names the config does not expect, and parameters nothing fills ----
def _unexpected(canon: str, src: AnySource, cfg: DSV4Config, include_mtp: bool, out: Accounting) -> None:
    """A tensor maps to a canonical name the config does not have: explained, or unmapped."""
    part = part_of(canon)
    if part != "main" and not include_mtp:
        out.explained.append({"name": src.tensor, "file": src.file, "reason": "MTP block not loaded (--no-mtp)"})
    elif _is_hash_layer_bias(canon, cfg):
        out.explained.append({"name": src.tensor, "file": src.file, "reason": "hash layers route by tid2eid; "
                              "a saved selection bias is never read (transformers creates one per layer)"})
    elif part != "main" and int(part[4:]) >= cfg.n_mtp_layers:
        out.problems.append(Problem(EXTRA_MTP_LAYER, part, src.tensor, src.file,
                                    f"MTP layer {part[4:]} but config declares num_nextn_predict_layers="
                                    f"{cfg.n_mtp_layers} (a DSpark-style multi-stage drafter is not a method=mtp "
                                    "block)"))
    else:
        out.problems.append(Problem(UNEXPECTED, part, src.tensor, src.file, f"maps to {canon}, which this config "
                                    "does not have (layer type, count or shape mismatch)"))


def _is_hash_layer_bias(canon: str, cfg: DSV4Config) -> bool:
    layer, _, rest = canon.removeprefix("layers.").partition(".")
    return canon.startswith("layers.") and rest == "ffn.gate.bias" and layer.isdigit() and cfg.is_hash_layer(int(layer))


def _missing(param: str, spec: ParamSpec) -> Problem:
    what = "MTP parameter not found" if spec.part != "main" else "not found"
    return Problem(MISSING, spec.part, param, "", f"{what} under any known spelling")
