"""One native load: plan -> per-class quant configs -> vLLM's target and MTP built and filled.

    from vllm_deepseek_v4.native import load_native
    res = load_native(path, device="cpu")      # or "meta": headers only
    res.target, res.mtp                        # vLLM's own DeepseekV4ForCausalLM / DeepSeekV4MTP
    res.reports["mtp"].to_json()               # accounting, quant methods, shared embed/head
    res.process_weights()                      # vLLM's process_weights_after_loading on both (cpu only)
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .loader import ClassReport, load_class, module_schemes
from .quant_config import QuantChoice, choose_family, extra_ignored, make_quant_config

__all__ = ["NativeResult", "load_native"]


@dataclass
class NativeResult:
    path: str
    device: str
    tp: int
    plan: Any
    vllm_config: Any = None
    target: Any = None
    mtp: Any = None
    quant: dict[str, QuantChoice] = field(default_factory=dict)
    quant_configs: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, ClassReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    processed: bool = False
    load_s: dict[str, float] = field(default_factory=dict)       # per kind: wall seconds inside load_class
    load_cpu_s: dict[str, float] = field(default_factory=dict)   # ... and this process's CPU seconds

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.reports.values())

    def process_weights(self) -> None:
        """vLLM's ``process_weights_after_loading`` on both classes (repacks weights: compare values before)."""
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        from .standins import cpu_standins

        with cpu_standins():
            for kind, model in (("target", self.target), ("mtp", self.mtp)):
                if model is None:
                    continue
                vc = _with_quant(self.vllm_config, self.quant_configs.get(kind))
                mc = vc.model_config if kind == "target" else vc.speculative_config.draft_model_config
                with set_current_vllm_config(vc):
                    process_weights_after_loading(model, mc, torch.device(self.device))
        self.processed = True


def _with_quant(vc: Any, qc: Any) -> Any:
    import copy

    out = copy.copy(vc)
    object.__setattr__(out, "quant_config", qc)
    return out


def load_native(path: str, *, device: str = "meta", tp: int = 1, rank: int = 0, plan: Any = None,
                with_mtp: bool = True, own_kernels: bool = True) -> NativeResult:
    """Build vLLM's own target (and MTP draft) for ``path`` and load them through our plan.

    ``device="meta"`` reads headers only (tensors become meta tensors of the right dtype and shape);
    ``"cpu"`` reads values. ``tp > 1``: vLLM's TP group is made to report ``tp`` ranks with this process as
    ``rank`` (meta only: no collective runs while building or loading). ``own_kernels``: modules vLLM's DSv4
    forward has no kernel for run ours (``draft_kernels.install``); False shows what vLLM alone would build.
    """
    from .draft_kernels import install
    from ..loader import build_plan
    from .build import construct, ensure_distributed, make_vllm_config, share_from_target, tp_rank_view
    from .standins import cpu_standins

    if tp > 1 and device != "meta":
        raise ValueError("tp > 1 is checked on the meta device only (one process plays one rank)")
    plan = plan if plan is not None else build_plan(path)
    res = NativeResult(path, device, tp, plan)
    if not plan.ok:
        res.problems += [f"plan: {p}" for p in plan.problems()]
        return res
    with_mtp = with_mtp and plan.include_mtp and plan.cfg.n_mtp_layers > 0
    kinds = ("target", "mtp") if with_mtp else ("target",)
    for kind in kinds:
        mods, probs = module_schemes(plan, kind)
        choice = choose_family(mods)
        res.quant[kind] = choice
        res.problems += [f"{kind}: {p}" for p in probs + choice.problems]
    if res.problems:
        return res
    from ..loader.stream import PositionalReader

    reader_cm = PositionalReader(plan.checkpoint) if device != "meta" else contextlib.nullcontext()
    with cpu_standins(), reader_cm as reader:
        vc = make_vllm_config(path, tp=tp, native=True, with_mtp=with_mtp)
        res.vllm_config = vc
        ensure_distributed(vc)
        with tp_rank_view(tp, rank):
            for kind in kinds:
                res.quant_configs[kind] = make_quant_config(res.quant[kind], extra_ignored=extra_ignored(kind, plan))
            res.target = construct(vc, "target", device=device, quant_config=res.quant_configs["target"])
            kernels = install(res.target, vc.model_config.dtype) if own_kernels else {}
            with _timed(res, "target"):
                res.reports["target"] = load_class(res.target, "target", plan, reader=reader, device=device,
                                                   family=res.quant["target"].family,
                                                   quant_config=res.quant_configs["target"])
            res.reports["target"].own_kernels = kernels
            if with_mtp:
                res.mtp = construct(vc, "mtp", device=device, quant_config=res.quant_configs["mtp"],
                                    share_embeddings=True)
                shared = share_from_target(res.mtp, res.target)
                kernels = install(res.mtp, vc.model_config.dtype) if own_kernels else {}
                with _timed(res, "mtp"):
                    res.reports["mtp"] = load_class(res.mtp, "mtp", plan, reader=reader, device=device,
                                                    family=res.quant["mtp"].family,
                                                    quant_config=res.quant_configs["mtp"], shared=shared)
                res.reports["mtp"].own_kernels = kernels
    return res


@contextlib.contextmanager
def _timed(res: NativeResult, kind: str) -> Iterator[None]:
    """Record the wall and CPU seconds of one class's ``load_class`` (``benchmarks/native_load.py`` reads them)."""
    c0, t0 = time.process_time(), time.perf_counter()
    yield
    res.load_s[kind], res.load_cpu_s[kind] = time.perf_counter() - t0, time.process_time() - c0
