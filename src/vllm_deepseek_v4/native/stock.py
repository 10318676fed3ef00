"""What vLLM's *unmodified* loaders do with an artifact: the baseline ``dsv4 check-vllm`` reports as ``stock``.

Both classes are built the way vLLM builds them (the quant config vLLM derives from the artifact's
``quantization_config``, the same object for the draft), then every tensor on disk is fed, under its on-disk
name, to vLLM's own ``load_weights``. Recorded per class: the names vLLM's loader skips (by vLLM's own rules:
the target's weights mapper, the draft's ``is_unused_checkpoint_weight``), the parameters left unloaded and
the exception, if any. The draft's embedding and heads are left to vLLM's proposer, which replaces them by
the target's at PP = 1; they are listed with that note.
"""
from __future__ import annotations

import math
import traceback
from typing import Any

_SMALL = 1 << 16

__all__ = ["stock_load"]


def _tensors(plan: Any, device: str) -> Any:
    """``(on-disk name, tensor)`` for every tensor of the artifact (meta tensors on ``meta``)."""
    import torch

    from ..checkpoint.format import TORCH_DTYPE_NAMES
    from ..loader.stream import PositionalReader

    infos = list(plan.checkpoint.tensors.values())
    if device == "meta":
        # headers only: meta tensors, except small ones as CPU zeros (vLLM allocates a few parameters, e.g.
        # the compressor's ape, on an explicit device even under a meta build, and copy_ from meta fails)
        for info in infos:
            dt = getattr(torch, TORCH_DTYPE_NAMES[info.dtype])
            small = math.prod(info.shape) <= _SMALL
            yield info.name, torch.zeros(info.shape, dtype=dt) if small else torch.empty(info.shape, dtype=dt,
                                                                                         device="meta")
        return
    with PositionalReader(plan.checkpoint) as reader:
        for info in infos:
            t, _ = reader.read(info)
            yield info.name, t


def _class_report(model: Any, loaded: set[str] | None, skipped: list[dict[str, str]], exc: str | None,
                  notes: dict[str, str]) -> dict[str, Any]:
    params = [n for n, _ in model.named_parameters()]
    unloaded = None if loaded is None else [{"param": p, **({"note": notes[p]} if p in notes else {})}
                                            for p in params if p not in loaded]
    methods = {}
    for name, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        if qm is not None:
            inner = getattr(module, "scheme", None)
            methods[name] = type(qm).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
    return {"params": len(params), "loaded": None if loaded is None else len(loaded & set(params)),
            "unloaded": unloaded,
            "skipped": skipped, "exception": exc, "quant_methods": methods}


def stock_load(path: str, plan: Any, *, device: str = "meta") -> dict[str, Any]:
    """Run vLLM's own loaders on ``path``; returns ``{"target": {...}, "mtp": {...}}`` (each may hold only
    ``exception`` when the class could not even be built)."""
    from .build import construct, ensure_distributed, make_vllm_config
    from .standins import cpu_standins

    out: dict[str, Any] = {}
    with cpu_standins():
        try:
            vc = make_vllm_config(path, native=False, with_mtp=plan.cfg.n_mtp_layers > 0)
        except Exception as e:          # vLLM refuses the artifact's config: that is the stock result
            return {"target": {"exception": _exc(e)}, "mtp": {"exception": _exc(e)}}
        ensure_distributed(vc)
        names = list(plan.checkpoint.tensors)
        files = {n: i.file for n, i in plan.checkpoint.tensors.items()}
        try:
            target = construct(vc, "target", device=device, quant_config=vc.quant_config)
        except Exception as e:
            out["target"] = {"exception": _exc(e)}
            target = None
        if target is not None:
            mapper = target.hf_to_vllm_mapper
            skipped = [{"name": n, "file": files[n], "reason": "dropped by vLLM's weights mapper"}
                       for n in names if mapper._map_name(n) is None]
            loaded, exc = _run(lambda: target.load_weights(_tensors(plan, device)))
            out["target"] = _class_report(target, loaded, skipped, exc, {})
        if vc.speculative_config is not None:
            try:
                mtp = construct(vc, "mtp", device=device, quant_config=vc.quant_config)
            except Exception as e:
                out["mtp"] = {"exception": _exc(e)}
                return out
            skipped = [{"name": n, "file": files[n], "reason": "not an MTP-layer name: skipped by the draft's "
                        "loader"} for n in names if mtp.is_unused_checkpoint_weight(n)]
            loaded, exc = _run(lambda: mtp.load_weights(_tensors(plan, device)))
            notes = {"model.embed_tokens.weight": "replaced by the target's embedding by vLLM's proposer (PP = 1)"}
            for idx in mtp.model.layers:
                notes[f"model.layers.{idx}.shared_head.head.weight"] = ("replaced by the target's lm_head by vLLM's "
                                                                         "proposer (PP = 1)")
            out["mtp"] = _class_report(mtp, loaded, skipped, exc, notes)
    return out


def _run(fn: Any) -> tuple[set[str] | None, str | None]:
    try:
        return set(fn()), None
    except Exception as e:
        return None, _exc(e)


def _exc(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"
