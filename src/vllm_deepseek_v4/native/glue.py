"""The hooks vLLM's own DeepSeek-V4 classes call when the load plan drives them (the upstream PR's glue).

Used in two places, with the same relative imports: in this package, and copied as
``vllm/models/deepseek_v4/loading/native/glue.py`` by ``scripts/upstream_branch.py``, where vLLM's
``nvidia`` / ``amd`` / ``xpu`` ``DeepseekV4ForCausalLM.load_weights`` / ``DeepSeekV4MTP.load_weights`` and the
MTP layer's quant config call it:

- ``model_path(config)``: the artifact directory (a hub id resolved to its HF-cache snapshot as vLLM does;
  refused with ``ModelPathError`` when it cannot be);
- ``plan_for(path)``: the load plan of that directory (headers only; cached per directory and shard sizes);
  None only with ``VLLM_DSV4_STOCK_LOADER=1`` (the caller then runs vLLM's stock mapping, asked for);
- ``mtp_quant_config(vllm_config, default)``: the draft's own quant config, from the schemes detected on the
  draft's tensors (never the target's object); ``target_quant_config``: the same for the target where vLLM's
  own config is compressed-tensors (its checkpoint-name targets never match vLLM's modules);
- ``load_weights_from_plan(model, kind, weights, path)``: reads every tensor the plan places for this class
  straight from the artifact (one positional read per tensor; vLLM's iterator is closed unconsumed, so a
  shard vLLM would skip for the draft -- the one holding the top-level ``head`` / ``embed`` -- is still read,
  and no tensor is held longer than its copy), routes it through the rule tables into the model's parameters
  (their own ``weight_loader``: vLLM's TP slicing), and raises with every problem named when a parameter is
  left unfilled, a tensor is unexplained or a quant method does not implement the scheme on disk. Returns
  the loaded parameter names.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

from .loader import load_class, module_schemes
from .paths import ModelPathError, model_source, resolve_model_dir
from .quant_config import choose_family, extra_ignored, make_quant_config

__all__ = ["plan_for", "mtp_quant_config", "target_quant_config", "install_own_kernels", "load_weights_from_plan", "model_path", "model_quant_config",
           "with_quant_config",
           "PlanLoadError", "ModelPathError", "stock_loader_requested"]

logger = logging.getLogger(__name__)
_CACHE: dict[str, tuple[Any, Any]] = {}


class PlanLoadError(ValueError):
    """The artifact cannot be loaded completely into this class; the message lists every problem."""


def model_path(obj: Any) -> str:
    """The artifact directory of a ``VllmConfig`` (its draft's model for a speculative config), a
    ``ModelConfig`` or an HF config (``_name_or_path``): a local directory as is, a hub id resolved to its HF-cache
    snapshot the way vLLM's loader downloads it (``paths.resolve_model_dir``). Raises ``ModelPathError`` when it
    cannot be resolved: there is no way past the plan."""
    return resolve_model_dir(*model_source(obj))


def _stamp(path: str) -> Any:
    return tuple(sorted((e.name, e.stat().st_size) for e in os.scandir(path) if e.name.endswith(".safetensors")))


def plan_for(path: str) -> Any:
    """The load plan of ``path`` (a local directory, see :func:`model_path`), cached; None only with
    ``VLLM_DSV4_STOCK_LOADER=1`` (vLLM's stock mapping asked for explicitly)."""
    if stock_loader_requested():
        return None
    if not path or not os.path.isdir(path):
        raise ModelPathError(f"{path!r}: not an artifact directory; DeepSeek-V4 weights load only through the "
                             "load plan (set VLLM_DSV4_STOCK_LOADER=1 for vLLM's stock mapping)")
    from ..loader import build_plan

    stamp = _stamp(path)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    plan = build_plan(path)
    _CACHE.clear()
    _CACHE[path] = (stamp, plan)
    return plan


def stock_loader_requested() -> bool:
    return os.environ.get("VLLM_DSV4_STOCK_LOADER") == "1"


def _raise_plan(plan: Any) -> None:
    if not plan.ok:
        raise PlanLoadError(f"{plan_path(plan)}: the checkpoint cannot be loaded:\n  " +
                            "\n  ".join(str(p) for p in plan.problems()))


def plan_path(plan: Any) -> str:
    return getattr(plan.checkpoint, "root", "")


def _class_quant_config(vllm_config: Any, kind: str) -> Any:
    """``kind``'s (``target`` / ``mtp``) quant config from the schemes detected on its own tensors."""
    plan = plan_for(model_path(vllm_config))
    _raise_plan(plan)
    mods, problems = module_schemes(plan, kind)
    choice = choose_family(mods)
    if problems or choice.problems:
        raise PlanLoadError(f"the DeepSeek-V4 {kind}'s quant config cannot be built:\n  "
                            + "\n  ".join(problems + choice.problems))
    qc = make_quant_config(choice, extra_ignored=extra_ignored(kind, plan))
    logger.info("DeepSeek-V4 %s: own quant config %s (experts %s) from its tensors",
                "MTP draft" if kind == "mtp" else "target", type(qc).__name__ if qc is not None else "none",
                choice.experts)
    return qc


def mtp_quant_config(vllm_config: Any, default: Any) -> Any:
    """The MTP draft's quant config decided from the draft's own tensors; ``default`` (vLLM's object) only
    with ``VLLM_DSV4_STOCK_LOADER=1``."""
    if stock_loader_requested():
        return default
    return _class_quant_config(vllm_config, "mtp")


def target_quant_config(vllm_config: Any, default: Any) -> Any:
    """The target's quant config: vLLM's own object (``default``), except where it is compressed-tensors.
    Its targets / ignore lists are written in checkpoint names (``layers.0.ffn.shared_experts.w2``), which
    never match vLLM's module names (``model.layers.0.ffn.shared_experts.down_proj``), so vLLM builds those
    modules unquantized and fails loading (``KeyError ...weight_global_scale``); the plan's config lists
    vLLM's runtime names. ``default`` with ``VLLM_DSV4_STOCK_LOADER=1``."""
    if stock_loader_requested() or _family(default) != "compressed_tensors":
        return default
    return _class_quant_config(vllm_config, "target")


def install_own_kernels(model: Any, vllm_config: Any) -> dict[str, str]:
    """Modules of ``model`` whose on-disk format vLLM's DeepSeek-V4 forward has no kernel for (an NVFP4
    ``wo_a``: vLLM's ``o_proj`` reads the weight itself) get ours (``draft_kernels.install``); returns module ->
    what runs it. Call after the modules are built, before loading."""
    from .draft_kernels import install

    done = install(model, vllm_config.model_config.dtype)
    if done:
        logger.info("DeepSeek-V4: our kernels for %d module(s) vLLM has none for: %s", len(done), ", ".join(done))
    return done


def model_quant_config(model: Any) -> Any:
    """The quant config object ``model``'s modules were built with (any platform's classes): read off the
    first quantized module's method; None when every module is unquantized."""
    for _, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        for attr in ("quant_config", "quantization_config"):
            qc = getattr(qm, attr, None)
            if qc is not None and not isinstance(qc, (dict, list)) and hasattr(qc, "get_name"):
                return qc
    return None


def with_quant_config(vllm_config: Any, quant_config: Any) -> Any:
    """A shallow copy of ``vllm_config`` whose ``quant_config`` is ``quant_config`` (the same object when it
    already is): vLLM's decoder layer reads ``vllm_config.quant_config``, so the draft's block gets its own."""
    if getattr(vllm_config, "quant_config", None) is quant_config:
        return vllm_config
    import copy

    out = copy.copy(vllm_config)
    object.__setattr__(out, "quant_config", quant_config)
    return out


def _family(qc: Any) -> str:
    if qc is None:
        return "unquantized"
    names = {c.__name__ for c in type(qc).__mro__}
    if "CompressedTensorsConfig" in names:
        return "compressed_tensors"
    if "Fp8Config" in names or "DeepseekV4FP8Config" in names:
        return "deepseek_fp8"
    return "unknown:" + type(qc).__name__


def load_weights_from_plan(model: Any, kind: str, weights: Iterable[tuple[str, Any]], path: str,
                           *, quant_config: Any = "model") -> set[str] | None:
    """Load vLLM's ``kind`` class (``target`` / ``mtp``) through the plan of ``path`` (:func:`model_path`); None
    (nothing consumed) only with ``VLLM_DSV4_STOCK_LOADER=1``. ``quant_config``: the config the
    class was built with (default: read off its modules). Raises :class:`PlanLoadError` naming every problem."""
    plan = plan_for(path)
    if plan is None:
        return None
    _raise_plan(plan)
    if kind == "mtp" and not (plan.include_mtp and plan.cfg.n_mtp_layers > 0):
        raise PlanLoadError(f"{path}: no MTP block to load")
    if isinstance(quant_config, str) and quant_config == "model":
        quant_config = model_quant_config(model)
    from ..loader.stream import PositionalReader

    close = getattr(weights, "close", None)
    if callable(close):          # vLLM's iterator is not consumed: the plan reads each tensor it places
        close()
    device = next((p.device.type for p in model.parameters()), "cpu")
    with PositionalReader(plan.checkpoint) as reader:
        rep = load_class(model, kind, plan, reader=reader, device="meta" if device == "meta" else device,
                         family=_family(quant_config), quant_config=quant_config)
    problems = ([f"{u['param']}: {u['reason']}" for u in rep.uncovered] + list(rep.errors)
                + list(rep.quant_mismatches))
    if problems:
        raise PlanLoadError(f"{path}: DeepSeek-V4 {kind} not loaded completely ({len(problems)} problems):\n  "
                            + "\n  ".join(problems[:40]))
    # which case filled the draft's head / embed (here: "own", from the top-level tensors; the proposer may
    # then replace the modules with the target's at PP = 1), kept on the model and logged: never left to luck
    model.dsv4_head_embed = {p: {"case": v["case"], "source": v["source"]} for p, v in rep.shared.items()}
    logger.info("DeepSeek-V4 %s loaded through the load plan: %d/%d parameters, %d padding, %d tensors explained%s",
                kind, rep.covered, rep.params, len(rep.padding), len(rep.unused),
                "".join(f"; {p}: {v['case']} ({v['source']})" for p, v in sorted(rep.shared.items())))
    return {n for n, _ in model.named_parameters()}
