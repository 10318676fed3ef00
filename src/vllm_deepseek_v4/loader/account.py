"""Strict accounting: every expected parameter filled exactly once, every tensor on disk used or explained.

Two paths, one answer. The bulk path takes batches of plain renames (``naming.batch``) whose canonical
names are all one role of expected linear modules, lines up the batches that fill the same modules, and
classifies each distinct (logical shape, roles, dtypes, shapes) once: Flash's 34k expert modules are a
handful of kinds. Everything else -- plain tensors, slices of fused tensors, a name filled twice, shared
aliases, anything unexpected -- goes tensor by tensor through the rules and messages below. Problems are
reported in the order a tensor-by-tensor pass would meet them (tensor order, then parameter order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, compress, filterfalse, repeat
from operator import itemgetter, not_
from typing import TYPE_CHECKING, NamedTuple, Union

from ..checkpoint import TensorInfo
from ..errors import DSV4Error
from ..naming.rule import ROLE_SUFFIXES
from ..quant.detect import FLOAT_DTYPES, ModuleQuant, TensorMeta, classify_module
from .expected import FLOAT, INDEX, LINEAR, ParamSpec

if TYPE_CHECKING:
    from .plan import LoadPlan

__all__ = ["Source", "AnySource", "ParamPlan", "Found", "account", "SHARED"]

_ROLES = frozenset(ROLE_SUFFIXES)
_MTP = re.compile(r"^mtp\.(\d+)\.")
SHARED = ("embed.weight", "head")   # plain tensor / linear module shared by the main model and the MTP draft
_DTYPE, _SHAPE, _FIRST = itemgetter(1), itemgetter(2), itemgetter(0)     # TensorInfo.dtype, .shape
_NAME, _KIND = itemgetter(0), itemgetter(2)                               # ParamSpec.name, .kind


class Source(NamedTuple):
    """A slice of an on-disk tensor (after ``ops``) that fills a parameter role.

    A whole tensor fills a role as its ``TensorInfo``, which reads the same (``tensor``, ``file``, ``dtype``,
    ``shape``, ``ops == ()``): 69k whole tensors in Flash, no copy of each.
    """

    tensor: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    ops: tuple[tuple, ...] = ()


class ParamPlan(NamedTuple):
    """How one expected parameter is filled: its scheme (linears) and the source of each role."""

    spec: ParamSpec
    roles: dict[str, AnySource]
    quant: ModuleQuant | None = None
    aliases: tuple[AnySource, ...] = ()   # extra copies of a shared tensor: compared when loading

    @property
    def scheme(self) -> str:
        return self.quant.scheme if self.quant else ""


AnySource = Union[Source, TensorInfo]       # what fills a role: a slice, or a whole tensor
_new_param = partial(tuple.__new__, ParamPlan)


@dataclass(slots=True)
class Found:
    """Tensors renamed as a batch: tensor ``sources[i]`` fills canonical name ``canonical[i]``; ``index`` = its
    position in the checkpoint."""

    canonical: list[str]
    sources: list[TensorInfo]
    index: list[int]
    text: str                   # "\n".join(canonical)


class _Kinds:
    """Schemes by (logical shape, sorted (role, dtype, shape)): 34k expert modules are a few kinds, and equal
    schemes share one ``ModuleQuant``."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, ModuleQuant] = {}
        self._same: dict[tuple, ModuleQuant] = {}

    def get(self, key: tuple) -> ModuleQuant | None:
        return self._by_key.get(key)

    def add(self, key: tuple, q: ModuleQuant) -> ModuleQuant:
        q = self._same.setdefault((q.scheme, q.variant, tuple(q.roles.items())), q)
        self._by_key[key] = q
        return q


@dataclass(slots=True)
class _Role:
    """A batch that fills one role of a set of expected linear modules."""

    role: str
    modules: list[str]
    found: Found
    modules_text: str                                           # "\n".join(modules)
    specs: list[ParamSpec] = field(default_factory=list)        # of ``modules``
    by_module: dict[str, int] = field(default_factory=dict)     # module -> position, built when needed

    def positions(self, modules: list[str]) -> list[int]:
        if not self.by_module:
            self.by_module = dict(zip(self.modules, range(len(self.modules))))
        return list(map(self.by_module.__getitem__, modules))


def account(plan: LoadPlan, specs: list[ParamSpec], batches: list[Found],
            loose: list[tuple[int, str, AnySource]]) -> None:
    """Fill ``plan.params`` / ``missing`` / ``errors`` / ``unmapped`` / ``explained`` from resolved tensors.

    ``loose``: ``(tensor position, canonical name, source)`` for tensors resolved one by one.
    """
    is_linear = list(map(LINEAR.__eq__, map(_KIND, specs)))
    plain = dict(compress(zip(map(_NAME, specs), specs), map(not_, is_linear)))
    linear = dict(compress(zip(map(_NAME, specs), specs), is_linear))
    # only a plain parameter named like a linear's role (<linear>.weight) could hide in a batch of linear
    # roles; then batches are checked against the plain names (no DSv4 parameter is named so)
    plain_like_role = any(p.rpartition(".")[2] in _ROLES and p.rpartition(".")[0] in linear for p in plain)
    bulk: list[_Role] = []
    slow = list(loose)
    for b in batches:
        item = _as_role(b, plain if plain_like_role else {})
        if item is None:
            slow += zip(b.index, b.canonical, b.sources)
        else:
            bulk.append(item)
    families = _families(bulk, linear, slow)
    cells = []
    slow_modules = {module for module, _, role in (canon.rpartition(".") for _, canon, _ in slow) if role in _ROLES}
    for modules, items in _cells(families):
        # a role twice (one name filled twice), or a module with roles from the slow path too:
        # those modules go to the slow path whole, which reports or aliases them
        moved = set(modules) if len({it.role for it in items}) < len(items) else slow_modules.intersection(modules)
        if moved:
            for it in items:
                pos = it.positions(sorted(moved))
                f = it.found
                slow += zip(map(f.index.__getitem__, pos), map(f.canonical.__getitem__, pos),
                            map(f.sources.__getitem__, pos))
            modules = [m for m in modules if m not in moved]
        if modules:
            cells.append((modules, items))
    slow.sort(key=_FIRST)
    found: dict[str, list[AnySource]] = {}
    for _, canon, src in slow:
        found.setdefault(canon, []).append(src)

    by_module: dict[str, dict[str, list[AnySource]]] = {}
    for canon, sources in found.items():
        if canon in plain:
            continue
        module, _, role = canon.rpartition(".")
        if role in _ROLES and module in linear:
            by_module.setdefault(module, {})[role] = sources
            continue
        _unexpected(plan, canon, sources)
    _account_plain(plan, plain, found)

    made = plan.params                          # after the plain ones: linear modules in spec order,
    made.update(dict.fromkeys(linear))          # each filled below (None until then)
    errors: list[tuple[str, str]] = []          # (module, message): reported in parameter order
    kinds = _Kinds()
    for modules, items in cells:
        _bulk_cell(modules, items, linear, kinds, made, errors)
    for module in filter(by_module.__contains__, linear):
        _slow_module(module, linear[module], by_module[module], kinds, made, errors)

    # every module is filled unless one is reported (errors) or no tensor names it at all (missing)
    if errors or sum(len(modules) for modules, _ in cells) + len(by_module) < len(linear):
        unfilled = [m for m, pp in made.items() if pp is None]
        covered = set(by_module).union(*(modules for modules, _ in cells))
        plan.missing += [{"param": f"{m}.weight", "reason": _missing_reason(m)}
                         for m in filterfalse(covered.__contains__, unfilled)]
        for m in unfilled:
            del made[m]
    if errors:
        order = dict(zip(linear, range(len(linear))))
        errors.sort(key=lambda e: order[e[0]])
        plan.errors += [msg for _, msg in errors]


# ---- bulk path ----
def _as_role(b: Found, plain: dict[str, ParamSpec]) -> _Role | None:
    """The batch as one role of a list of modules (``modules_text``; ``_families`` splits it), or None if any
    name in it is something else."""
    canon = b.canonical
    if not canon:
        return None
    role = canon[0].rpartition(".")[2]
    if role not in _ROLES:
        return None
    end = "." + role
    text = b.text
    # each "\n" ends one name: every name ends with .role
    if not text.endswith(end) or text.count(end + "\n") != len(canon) - 1 or not plain.keys().isdisjoint(canon):
        return None
    return _Role(role, [], b, text.replace(end + "\n", "\n")[:-len(end)])


def _families(bulk: list[_Role], linear: dict[str, ParamSpec],
              slow: list[tuple[int, str, AnySource]]) -> dict[frozenset[str], list[_Role]]:
    """Batches by the set of modules they fill, each module an expected linear, once per batch; batches that
    fail this go to ``slow``. Roles of one module list (weight, scale) usually list it in the same order."""
    by_text: dict[str, list[_Role]] = {}
    for item in bulk:
        by_text.setdefault(item.modules_text, []).append(item)
    families: dict[frozenset[str], list[_Role]] = {}
    for text, items in by_text.items():
        modules = text.split("\n")             # once for all roles of one module list
        module_set = frozenset(modules)
        specs = list(map(linear.get, modules))
        if len(module_set) < len(modules) or None in specs:
            for it in items:                    # a name twice in the batch, or not a linear's role
                f = it.found
                slow += zip(f.index, f.canonical, f.sources)
            continue
        for it in items:
            it.modules, it.specs = modules, specs   # one list for all: the same order
        families.setdefault(module_set, []).extend(items)
    return families


def _cells(families: dict[frozenset[str], list[_Role]]) -> list[tuple[list[str], list[_Role]]]:
    """Partition the modules by which batches fill them: within a cell every module has the same roles."""
    sets = list(families)
    if sum(map(len, sets)) == len(set().union(*sets)):         # disjoint: the usual case
        return [(items[0].modules, items) for items in families.values()]
    cells: list[tuple[set[str], list[frozenset[str]]]] = []
    for fs in sets:
        rest, refined = set(fs), []
        for cell, members in cells:
            common = cell & rest
            if not common:
                refined.append((cell, members))
                continue
            refined.append((common, members + [fs]))
            if len(common) < len(cell):
                refined.append((cell - common, members))
            rest -= common
        if rest:
            refined.append((rest, [fs]))
        cells = refined
    return [(sorted(cell), [it for fs in members for it in families[fs]]) for cell, members in cells]


def _bulk_cell(modules: list[str], items: list[_Role], linear: dict[str, ParamSpec], kinds: _Kinds,
               made: dict[str, ParamPlan], errors: list[tuple[str, str]]) -> None:
    """Classify and plan modules that all have the roles of ``items``, each distinct kind once."""
    cols = [it.found.sources if it.modules is modules or it.modules == modules else
            list(map(it.found.sources.__getitem__, it.positions(modules))) for it in items]
    roles = [it.role for it in items]
    specs = items[0].specs if items[0].modules is modules else list(map(linear.__getitem__, modules))
    by_role = sorted(range(len(roles)), key=roles.__getitem__)
    # one flat tuple per module: (logical shape, dtype and shape of each role in role order)
    def keys():
        return zip(map(itemgetter(1), specs), *chain.from_iterable(
            (map(_DTYPE, cols[j]), map(_SHAPE, cols[j])) for j in by_role))
    quant: dict[tuple, ModuleQuant | None] = {}
    for key, i in dict(zip(keys(), range(len(modules)))).items():     # each kind once, with a module of it
        # the slow path's key: (logical shape, sorted (role, dtype, shape))
        slow_key = (key[0], tuple((roles[j], cols[j][i].dtype, cols[j][i].shape) for j in by_role))
        q = kinds.get(slow_key)
        if q is None:
            metas = {r: TensorMeta(c[i].tensor, c[i].dtype, c[i].shape, c[i].file) for r, c in zip(roles, cols)}
            try:
                q = kinds.add(slow_key, classify_module(modules[i], metas, *specs[i].shape))
            except DSV4Error:
                q = None                        # every module of this kind reports its own tensors below
        quant[key] = q
    distinct = {id(q): q for q in quant.values()}
    qs = list(map(quant.__getitem__, keys())) if len(distinct) > 1 else None
    col_of = dict(zip(roles, cols))
    for q in distinct.values():
        pick = range(len(modules)) if qs is None else [i for i, x in enumerate(qs) if x is q]
        if q is None:
            errors += [(modules[i], _classify_error(modules[i], specs[i], items, cols, i)) for i in pick]
            continue
        sel = (lambda xs: xs) if qs is None else (lambda xs: list(map(xs.__getitem__, pick)))
        dicts = _role_dicts(tuple(q.roles), [sel(col_of[s]) for s in q.roles.values()])
        made.update(zip(sel(modules), map(_new_param, zip(sel(specs), dicts, repeat(q), repeat(())))))


def _role_dicts(roles: tuple[str, ...], cols: list[list[AnySource]]) -> list[dict[str, AnySource]]:
    """``{roles[j]: cols[j][i]}`` for every i; one or two roles (most schemes) as dict displays, 3x faster."""
    if len(roles) == 1:
        (r,), (col,) = roles, cols
        return [{r: a} for a in col]
    if len(roles) == 2:
        r1, r2 = roles
        return [{r1: a, r2: b} for a, b in zip(*cols)]
    return list(map(dict, map(zip, repeat(roles), zip(*cols))))


def _classify_error(module: str, spec: ParamSpec, items: list[_Role], cols: list[list[AnySource]], i: int) -> str:
    """The slow path's message for module ``i``: its roles in tensor order, as the slow path would pass them."""
    pos = [it.found.index[it.positions([module])[0]] for it in items]
    order = sorted(range(len(items)), key=pos.__getitem__)
    metas = {items[j].role: TensorMeta(cols[j][i].tensor, cols[j][i].dtype, cols[j][i].shape, cols[j][i].file)
             for j in order}
    try:
        classify_module(module, metas, *spec.shape)
    except DSV4Error as e:
        return str(e)
    raise AssertionError(f"{module}: classified in bulk as bad, alone as good")


# ---- slow path (tensor by tensor) ----
def _account_plain(plan: LoadPlan, plain: dict[str, ParamSpec], found: dict[str, list[AnySource]]) -> None:
    for name, spec in plain.items():
        sources = found.get(name)
        if not sources:
            plan.missing.append({"param": name, "reason": _missing_reason(name)})
            continue
        primary, aliases = _pick_primary(plan.errors, name, sources)
        if primary is None:
            continue
        if _check_plain(plan, spec, primary) and all(_check_plain(plan, spec, a) for a in aliases):
            plan.params[name] = ParamPlan(spec, {"tensor": primary}, None, tuple(aliases))


def _slow_module(module: str, spec: ParamSpec, roles: dict[str, list[AnySource]], kinds: _Kinds,
                 made: dict[str, ParamPlan], errors: list[tuple[str, str]]) -> None:
    chosen: dict[str, AnySource] = {}
    aliases: list[AnySource] = []
    msgs: list[str] = []
    for role, sources in roles.items():
        primary, extra = _pick_primary(msgs, f"{module}.{role}", sources)
        if primary is None:
            errors += zip(repeat(module), msgs)
            return
        chosen[role] = primary
        aliases += extra
    key = (spec.shape, tuple(sorted((r, s.dtype, s.shape) for r, s in chosen.items())))
    q = kinds.get(key)
    if q is None:
        metas = {r: TensorMeta(s.tensor, s.dtype, s.shape, s.file) for r, s in chosen.items()}
        try:
            q = kinds.add(key, classify_module(module, metas, *spec.shape))
        except DSV4Error as e:
            errors.append((module, str(e)))
            return
    for a in aliases:
        if a.shape != chosen["weight"].shape:
            errors.append((module, f"{a.file}: {a.tensor}: alias of {chosen['weight'].tensor} with a "
                                   f"conflicting shape: expected {list(chosen['weight'].shape)}, found {list(a.shape)}"))
    made[module] = ParamPlan(spec, {r: chosen[s] for r, s in q.roles.items()}, q, tuple(aliases))


def _pick_primary(errors: list[str], name: str, sources: list[AnySource]) -> tuple[AnySource | None, list[AnySource]]:
    """One source per role. Several are only allowed for the shared embed/head (aliases, top level first)."""
    if len(sources) == 1:
        return sources[0], []
    base = name.rsplit(".", 1)[0] if name.startswith("head.") else name
    if base not in SHARED:
        errors.append(f"{name}: filled by {len(sources)} tensors: " +
                      ", ".join(f"{s.tensor} ({s.file})" for s in sources) + "; expected exactly one")
        return None, []
    ordered = sorted(sources, key=lambda s: (s.tensor.startswith(("mtp.", "model.layers.")), s.tensor))
    return ordered[0], ordered[1:]


def _check_plain(plan: LoadPlan, spec: ParamSpec, src: AnySource) -> bool:
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


def _unexpected(plan: LoadPlan, canon: str, sources: list[AnySource]) -> None:
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
