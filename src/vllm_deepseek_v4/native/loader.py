"""Load an artifact into vLLM's own DeepSeek-V4 classes, driven by our load plan, with strict accounting.

For every canonical tensor the plan knows (``plan.params``: module + quant roles, or a plain tensor) the rule
tables (``tables.py``) give vLLM's parameter, the shard id of a fused module, or -- for routed experts -- the
stacked parameter and (expert, shard) from vLLM's own expert mapping. The tensor then goes through the
parameter's own ``weight_loader`` (which does vLLM's TP slicing). Accounting is kept per parameter and per
*fill key* (shard index of a merged linear, ``(expert, w1|w2|w3)`` of a stacked expert tensor, or the whole
parameter): every key vLLM's module layout implies must be filled exactly once, or the parameter is listed as
padding (with the reason) or as shared with the target; every tensor on disk is consumed or explained.
Errors name the tensor, its file and the vLLM parameter.

Torch and vLLM are imported inside functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import tables as T
from .quant_config import ModuleScheme

__all__ = ["ClassReport", "module_schemes", "load_class", "EXPECTED_METHODS"]

# detected scheme -> the vLLM quant-method class names that implement it (linear / routed experts)
EXPECTED_METHODS: dict[tuple[str, str], tuple[str, ...]] = {
    ("bf16", "linear"): ("UnquantizedLinearMethod",),
    ("bf16", "experts"): ("UnquantizedFusedMoEMethod",),
    ("fp8_block", "linear"): ("Fp8LinearMethod", "CompressedTensorsLinearMethod"),
    ("fp8_block", "experts"): ("Fp8MoEMethod", "CompressedTensorsW8A8Fp8MoEMethod"),
    ("mxfp4", "experts"): ("Mxfp4MoEMethod",),
    # DenseFp4WeightMethod: vLLM's method wrapped where DSv4's forward has no kernel (draft_kernels.GAPS)
    ("nvfp4", "linear"): ("CompressedTensorsLinearMethod", "ModelOptNvFp4LinearMethod", "DenseFp4WeightMethod"),
    ("nvfp4", "experts"): ("ModelOptNvFp4FusedMoE", "CompressedTensorsW4A4Nvfp4MoEMethod",
                           "CompressedTensorsW4A4Nvfp4MoeMethod"),
    ("w4a16", "linear"): ("CompressedTensorsLinearMethod",),
    ("w4a16", "experts"): ("CompressedTensorsWNA16MoEMethod", "CompressedTensorsWNA16MarlinMoEMethod"),
}


@dataclass
class ClassReport:
    """What loading one vLLM class did: the JSON ``target`` / ``mtp`` objects of ``dsv4 check-vllm``."""

    params: int = 0
    covered: int = 0
    uncovered: list[dict[str, str]] = field(default_factory=list)
    unused: list[dict[str, str]] = field(default_factory=list)
    padding: list[dict[str, str]] = field(default_factory=list)
    shared: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    quant_family: str = "unquantized"
    quant_methods: dict[str, str] = field(default_factory=dict)
    quant_mismatches: list[str] = field(default_factory=list)
    filled: dict[str, list[str]] = field(default_factory=dict)    # vLLM param -> on-disk tensors, for messages
    own_kernels: dict[str, str] = field(default_factory=dict)     # module -> our kernel (draft_kernels.GAPS)

    @property
    def ok(self) -> bool:
        return not (self.uncovered or self.errors or self.quant_mismatches)

    def to_json(self, *, with_methods: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params, "covered": self.covered, "uncovered": self.uncovered,
                               "unused": self.unused, "padding": self.padding, "errors": self.errors,
                               "quant_family": self.quant_family}
        if self.shared:
            out["shared"] = self.shared
        if with_methods:
            out["quant_methods"] = self.quant_methods
            out["quant_mismatches"] = self.quant_mismatches
            out["own_kernels"] = self.own_kernels
        return out


def _part_of(kind: str, part: str) -> bool:
    return (part == "main") if kind == "target" else part.startswith("mtp.")


def module_schemes(plan: Any, kind: str) -> tuple[dict[str, ModuleScheme], list[str]]:
    """vLLM module -> scheme for the linear modules of class ``kind``, from the plan; shards and experts of
    one vLLM module must agree (vLLM builds one method per module)."""
    L = plan.cfg.n_layers
    seen: dict[str, tuple[ModuleScheme, str]] = {}
    problems: list[str] = []
    for name, pp in plan.params.items():
        if pp.quant is None or not _part_of(kind, pp.spec.part) or name == "head":
            continue
        t = T.lookup(kind, name, L)
        if t is None:
            continue
        ms = _scheme(pp)
        module = t.vllm if t.kind == T.LINEAR else t.vllm + ".experts"
        prev = seen.setdefault(module, (ms, name))
        if prev[0] != ms:
            problems.append(f"{module}: {prev[1]} is {prev[0].scheme}/{prev[0].variant} but {name} is "
                            f"{ms.scheme}/{ms.variant}; vLLM builds one quant method per module")
    return {m: s for m, (s, _) in seen.items()}, problems


def _scheme(pp: Any) -> ModuleScheme:
    q = pp.quant
    scale = pp.roles.get("scale")
    group = None
    if q.scheme == "w4a16":
        ws = pp.roles["weight_scale"]
        group = pp.spec.shape[1] // ws.shape[1] if ws.shape[1] else None
    return ModuleScheme(q.scheme, q.variant, scale.dtype if scale is not None else "", group,
                        "input_global_scale" in pp.roles or "input_scale" in pp.roles,
                        "weight_zero_point" in pp.roles)


# ---- loading ----
class _Ctx:
    def __init__(self, model: Any, kind: str, plan: Any, reader: Any, device: str, family: str,
                 quant_config: Any, report: ClassReport) -> None:
        import torch

        self.torch = torch
        self.model, self.kind, self.plan, self.reader, self.device = model, kind, plan, reader, device
        self.family, self.qc, self.report = family, quant_config, report
        self.params = dict(model.named_parameters())
        self.fills: dict[str, dict[Any, str]] = {}
        self.n_layers = plan.cfg.n_layers
        self._mapping: dict[tuple[int, str], tuple[str, int, str]] | None = None
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.tp, self.rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        self.pad_shared = getattr(quant_config, "weight_block_size", None) is not None
        # each tensor read is value-checked by its role (loader.values; DSV4_SKIP_VALUE_CHECKS=1: off)
        self.checks: dict[tuple[str, tuple], Any] = {}
        if device != "meta":
            from ..loader.values import plan_checks, value_checks_enabled
            if value_checks_enabled(plan.path):
                self.checks = {(c.tensor, c.ops): c for c in plan_checks(plan).values()}

    def expert_mapping(self) -> dict[tuple[int, str], tuple[str, int, str]]:
        """(expert, w1|w2|w3) -> (param prefix below the FFN, expert id, shard id): vLLM's own mapping."""
        if self._mapping is None:
            from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

            n = self.plan.cfg.n_routed_experts
            rows = RoutedExperts.make_expert_params_mapping(self.model, "w1", "w2", "w3", n)
            self._mapping = {}
            for param_prefix, weight_name, expert_id, shard_id in rows:
                m = re.fullmatch(r"experts\.(\d+)\.(w[123])\.", weight_name)
                if m:
                    self._mapping[(int(m.group(1)), m.group(2))] = (param_prefix, expert_id, shard_id)
        return self._mapping

    def tensor(self, src: Any) -> Any:
        if self.device == "meta":
            from ..checkpoint.format import TORCH_DTYPE_NAMES
            from ..loader.stream import apply_ops

            info = self.plan.checkpoint.tensors[src.tensor]
            dt = getattr(self.torch, TORCH_DTYPE_NAMES[info.dtype])
            return apply_ops(self.torch.empty(info.shape, dtype=dt, device="meta"), tuple(getattr(src, "ops", ()) or ()))
        t = self.reader.read_source(src)
        check = self.checks.get((src.tensor, tuple(src.ops)))
        if check is not None:
            check.check(t)
        return t


def _adapt(torch: Any, w: Any, param: Any) -> Any:
    """Byte-preserving reinterpretation where the checkpoint and vLLM store the same bytes under two dtypes
    (e8m0 scales kept as uint8, DeepSeek's int8 FP4 codes as uint8); scalars on disk become [1]."""
    views = {(torch.float8_e8m0fnu, torch.uint8), (torch.int8, torch.uint8), (torch.uint8, torch.int8),
             (torch.uint8, torch.float8_e8m0fnu)}
    if (w.dtype, param.dtype) in views:
        w = w.view(param.dtype)
    if w.dim() == 0:
        w = w.reshape(1)
    return w


def load_class(model: Any, kind: str, plan: Any, *, reader: Any, device: str, family: str, quant_config: Any,
               shared: dict[str, str] | None = None) -> ClassReport:
    """Fill vLLM's ``kind`` class (``target`` / ``mtp``) from ``plan``; returns the accounting.

    ``shared``: draft parameter -> target parameter for modules the draft shares with the target (PP = 1);
    those are not loaded again (the plan's top-level tensor already filled them in the target).
    """
    rep = ClassReport(quant_family=family)
    ctx = _Ctx(model, kind, plan, reader, device, family, quant_config, rep)
    shared = shared or {}
    n_mtp = plan.cfg.n_mtp_layers if plan.include_mtp else 0
    for name, pp in plan.params.items():
        own = _part_of(kind, pp.spec.part)
        top_shared = kind == "mtp" and name in ("embed.weight", "head")
        if not own and not top_shared:
            continue
        for k in (range(n_mtp) if (top_shared and name == "head") else [None]):
            t = T.lookup(kind, name, ctx.n_layers, k)
            if t is None:
                rep.errors.append(f"{name}: no rule places this canonical tensor in vLLM's {kind} class")
                continue
            if top_shared:
                pname = t.vllm if t.kind != T.LINEAR else t.vllm + ".weight"
                if pname in shared:
                    src = pp.roles.get("tensor") or pp.roles.get("weight")
                    rep.shared[pname] = {"case": "shared", "target_param": shared[pname], "source": src.tensor,
                                         "file": src.file, "reason": t.row.reason + " (vLLM shares the module at "
                                         "PP = 1; the draft holds no second copy)"}
                    continue
            _load_param(ctx, name, pp, t)
            if top_shared:
                pname = t.vllm if t.kind != T.LINEAR else t.vllm + ".weight"
                src = pp.roles.get("tensor") or pp.roles.get("weight")
                rep.shared[pname] = {"case": "own", "source": src.tensor, "file": src.file,
                                     "reason": "not shared with a target here: the draft loads the top-level tensor"}
    _unused(ctx, kind, plan)
    _account(ctx, set(shared))
    _methods(ctx)
    return rep


def _load_param(ctx: _Ctx, name: str, pp: Any, t: T.VllmTarget) -> None:
    rep = ctx.report
    if t.kind in (T.PLAIN, T.SINK):
        src = pp.roles["tensor"]
        _fill(ctx, t.vllm, None, src, lambda p, w: _plain(ctx, t, p, w))
        return
    scheme = pp.quant.scheme
    names = T.ROLE_NAMES.get(ctx.family, {}).get(scheme)
    if names is None:
        rep.errors.append(f"{name}: {scheme} modules cannot be built under vLLM's {ctx.family} config")
        return
    for role, src in pp.roles.items():
        suffix = names.get(role)
        if suffix is None:
            rep.errors.append(f"{src.file}: {src.tensor}: role {role!r} of {scheme} has no vLLM parameter under "
                              f"the {ctx.family} config")
            continue
        if t.kind == T.LINEAR:
            _fill(ctx, f"{t.vllm}.{suffix}", t.shard, src, lambda p, w, s=t.shard: _linear(ctx, p, w, s))
            continue
        got = ctx.expert_mapping().get((t.expert, t.shard))
        if got is None:
            rep.errors.append(f"{src.file}: {src.tensor}: vLLM's expert mapping has no entry for expert "
                              f"{t.expert} {t.shard}")
            continue
        prefix, expert_id, shard_id = got
        pname = f"{t.vllm}.{prefix}{suffix}"
        _fill(ctx, pname, (expert_id, shard_id), src,
              lambda p, w, n=pname, e=expert_id, s=shard_id: p.weight_loader(p, w, n, shard_id=s, expert_id=e,
                                                                              return_success=True))


def _fill(ctx: _Ctx, pname: str, key: Any, src: Any, call: Any) -> None:
    rep = ctx.report
    param = ctx.params.get(pname)
    where = f"{src.file}: {src.tensor}"
    if param is None:
        rep.errors.append(f"{where}: goes to vLLM parameter {pname}, which this class does not have "
                          f"(quant family {ctx.family})")
        return
    slot = ctx.fills.setdefault(pname, {})
    if key in slot:
        rep.errors.append(f"{where}: fills {pname} [{_key(key)}] already filled by {slot[key]}")
        return
    try:
        w = ctx.tensor(src)
        if ctx.pad_shared and ".shared_experts." in pname:
            w = _pad_shared(ctx, pname, w, param)
        w = _adapt(ctx.torch, w, param)
        if w.is_meta and not param.is_meta:
            # a parameter vLLM allocates on an explicit device even under a meta build (compressor ape):
            # headers only -> compare shapes, copy nothing
            if tuple(w.shape) != tuple(param.shape):
                raise ValueError(f"shape {list(w.shape)} on disk, {list(param.shape)} in vLLM")
            ok = True
        else:
            ok = call(param, w)
    except Exception as e:      # a vLLM weight_loader refusing a tensor: name everything involved
        rep.errors.append(f"{where}: loading into {pname} [{_key(key)}] failed: {type(e).__name__}: {e}")
        return
    if ok is False:
        rep.errors.append(f"{where}: {pname} [{_key(key)}]: vLLM's weight_loader reported no success "
                          "(expert not on this rank?)")
        return
    slot[key] = src.tensor
    rep.filled.setdefault(pname, []).append(src.tensor)


def _key(key: Any) -> str:
    if key is None:
        return "whole"
    if isinstance(key, tuple):
        return f"expert {key[0]} {key[1]}"
    return f"shard {key}"


def _pad_shared(ctx: _Ctx, pname: str, w: Any, param: Any) -> Any:
    """vLLM's own zero padding of block-FP8 shared experts (intermediate up to TP x 128)."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4Model

    before = tuple(w.shape)
    w = DeepseekV4Model._pad_shared_expert_weight(ctx.qc, pname, w)
    if tuple(w.shape) != before:
        reason = T.padding_reason(pname) or "zero padding"
        entry = {"param": pname, "reason": f"{reason} ({list(before)} -> {list(w.shape)} before TP slicing)"}
        if entry not in ctx.report.padding:
            ctx.report.padding.append(entry)
    return w


def _linear(ctx: _Ctx, param: Any, w: Any, shard: Any) -> Any:
    loader = param.weight_loader
    return loader(param, w) if shard is None else loader(param, w, shard)


def _plain(ctx: _Ctx, t: T.VllmTarget, param: Any, w: Any) -> None:
    if t.kind == T.SINK:
        n_local = w.shape[0] // ctx.tp
        piece = w.narrow(0, n_local * ctx.rank, n_local)
        if param.shape[0] < n_local:
            raise ValueError(f"{param.shape[0]} sink slots for {n_local} local heads")
        param.data[:n_local].copy_(piece)
        if param.shape[0] > n_local:
            ctx.report.padding.append({"param": t.vllm, "reason": f"{T.padding_reason(t.vllm)} "
                                       f"({n_local} heads -> {param.shape[0]} slots)"})
        return
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        if tuple(param.shape) != tuple(w.shape):
            raise ValueError(f"shape {list(w.shape)} on disk, {list(param.shape)} in vLLM")
        param.data.copy_(w)
        return
    loader(param, w)


# ---- accounting ----
def _expected_keys(ctx: _Ctx, pname: str) -> set[Any]:
    """The fill keys vLLM's module layout implies for ``pname`` (independent of the rule tables)."""
    module_name, _, leaf = pname.rpartition(".")
    module = ctx.model.get_submodule(module_name)
    sizes = getattr(module, "output_sizes", None)
    if sizes is not None and len(sizes) > 1 and not hasattr(module, "w13_weight") and "." in pname:
        return set(range(len(sizes)))
    if leaf.startswith(("w13_", "w2_")):
        n = ctx.plan.cfg.n_routed_experts
        shards = ("w1", "w3") if leaf.startswith("w13_") else ("w2",)
        return {(e, s) for e in range(n) for s in shards}
    return {None}


def _vllm_only(ctx: _Ctx, pname: str) -> str | None:
    """The reason ``pname`` is allocated by vLLM without a checkpoint source (and filled here), or None."""
    schemes, _ = module_schemes(ctx.plan, ctx.kind)
    for pat, applies, value, reason in T.VLLM_ONLY:
        if not re.search(pat, pname):
            continue
        module = pname.rsplit(".", 1)[0].removesuffix(".routed_experts")
        det = schemes.get(module)
        if applies == "nvfp4-weight-only" and det is not None and det.scheme == "nvfp4" and not det.input_scale:
            param = ctx.params[pname]
            if not param.is_meta:
                param.data.fill_(value)
            return reason
    return None


def _account(ctx: _Ctx, shared: set[str]) -> None:
    rep = ctx.report
    rep.params = len(ctx.params)
    for pname in ctx.params:
        if pname in shared:
            rep.covered += 1
            continue
        got = ctx.fills.get(pname, {})
        if not got:
            reason = _vllm_only(ctx, pname)
            if reason is not None:
                rep.padding.append({"param": pname, "reason": reason})
                continue
        want = _expected_keys(ctx, pname)
        missing = want - set(got)
        extra = set(got) - want
        if not missing and not extra:
            rep.covered += 1
            continue
        if not got:
            reason = "no tensor in the artifact fills it"
        elif missing:
            shown = ", ".join(sorted(_key(k) for k in missing)[:6])
            reason = f"partly filled (from {got[next(iter(got))]}); never filled: {shown}" + (
                f" ... ({len(missing)} in all)" if len(missing) > 6 else "")
        else:
            reason = f"filled at keys vLLM's layout does not have: {', '.join(sorted(_key(k) for k in extra))}"
        rep.uncovered.append({"param": pname, "reason": reason})


def _unused(ctx: _Ctx, kind: str, plan: Any) -> None:
    """Tensors on disk this class does not load, each with its reason (the plan's, or the alias rule's)."""
    rep = ctx.report
    mtp_names = re.compile(r"^(model\.)?(mtp\.|layers\.(\d+)\.mtp_block\.)")
    for e in plan.explained:
        is_mtp = bool(mtp_names.match(e["name"])) or _layer_at_least(e["name"], plan.cfg.n_layers)
        if (kind == "mtp") == is_mtp:
            rep.unused.append({"name": e["name"], "file": e["file"], "reason": e["reason"]})
    for name, pp in plan.params.items():
        if not pp.aliases or kind != "mtp":
            continue
        primary = pp.roles.get("tensor") or pp.roles.get("weight")
        for a in pp.aliases:
            rep.unused.append({"name": a.tensor, "file": a.file, "reason": f"a copy of the shared top-level "
                               f"{primary.tensor} (same shape{'' if ctx.device == 'meta' else ' and values'}); "
                               "the top-level tensor is the one used"})


def _layer_at_least(name: str, n_layers: int) -> bool:
    m = re.match(r"^(model\.)?layers\.(\d+)\.", name)
    return bool(m) and int(m.group(2)) >= n_layers


def _methods(ctx: _Ctx) -> None:
    """vLLM quant-method class per module, and whether it implements the scheme detected on disk."""
    rep = ctx.report
    schemes, _ = module_schemes(ctx.plan, ctx.kind)
    for mname, module in ctx.model.named_modules():
        qm = getattr(module, "quant_method", None)
        if qm is None:
            continue
        label = type(qm).__name__
        inner = getattr(module, "scheme", None)
        if inner is not None:
            label += f"({type(inner).__name__})"
        rep.quant_methods[mname] = label
        key = mname[:-len(".routed_experts")] if mname.endswith(".routed_experts") else mname
        det = schemes.get(key)
        if det is None:
            continue
        kind = "experts" if key.endswith(".experts") else "linear"
        allowed = EXPECTED_METHODS.get((det.scheme, kind), ())
        if type(qm).__name__ not in allowed:
            rep.quant_mismatches.append(f"{mname}: {det.scheme} on disk but vLLM built {label} "
                                        f"(expected one of {', '.join(allowed) or 'none known'})")
