"""Fill the portable model from an artifact: plan, build on meta with the detected schemes, stream, check.

Every tensor's values are checked as it streams (``loader.values``, via ``iter_plan_tensors``).

The trunk and every MTP layer get the schemes detected for *their own* modules. Each tensor is assigned as it
is read (peak extra memory ~ one tensor); anything still on the meta device afterwards is an error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MissingTensorError, QuantMismatchError
from ..quant import SCHEMES
from .plan import LoadPlan, build_plan
from .stream import iter_plan_tensors

if TYPE_CHECKING:
    import torch

    from ..model import DSV4Model

__all__ = ["schemes_from_plan", "load_model"]


def schemes_from_plan(plan: LoadPlan) -> dict[str, dict[str, str]]:
    """``{part: {group: scheme}}`` for the model builder; a group mixing schemes is refused by name
    (``LoadPlan.one_scheme_problems``)."""
    report = plan.quant_report()
    mixed = plan.one_scheme_problems(report)
    if mixed:
        raise QuantMismatchError(mixed[0].reason, file=mixed[0].file, tensor=mixed[0].tensor)
    return report


def load_model(path: str, *, dtype: "torch.dtype | None" = None, include_mtp: bool = True,
               progress: bool = True, plan: LoadPlan | None = None,
               check_values: bool | None = None) -> tuple["DSV4Model", LoadPlan]:
    """Return the filled model and its plan. Raises ``PlanError`` before reading anything if the plan is bad,
    ``TensorValueError`` on the first tensor holding values its role forbids (``loader.values``).
    ``check_values``: None follows ``DSV4_SKIP_VALUE_CHECKS``; False skips the value checks (says so)."""
    import torch

    from ..model import build_model

    plan = plan or build_plan(path, include_mtp=include_mtp)
    plan.raise_if_bad()
    dtype = dtype or torch.bfloat16
    cfg = plan.cfg
    if not plan.include_mtp:                  # a main-only plan fills no MTP block: build none
        cfg = cfg.without_mtp()
    model = build_model(cfg, schemes=schemes_from_plan(plan), dtype=dtype, device="meta")
    modules = dict(model.named_modules())
    for key, t in iter_plan_tensors(plan, progress=progress, check_values=check_values):
        assign_tensor(modules, key, t, dtype, plan.path)
    check_filled(model, plan.path, "model")
    return model, plan


def assign_tensor(modules: dict, key: str, t: "torch.Tensor", dtype: "torch.dtype", path: str) -> None:
    """Put canonical tensor ``key`` into its module (quantised roles keep their on-disk dtype)."""
    from torch import nn

    from ..model.linear import QLinear
    owner_path, _, attr = key.rpartition(".")          # "" is the root module (hc_head_fn, ...)
    owner = modules.get(owner_path)
    if owner is None:
        raise MissingTensorError(file=path, tensor=key, hint="the model has no module for this planned tensor")
    if isinstance(owner, QLinear) and SCHEMES[owner.scheme].has(attr):
        owner.set_role(attr, t.to(dtype) if owner.scheme == "bf16" else t)
        return
    current = getattr(owner, attr)
    new = t.to(current.dtype)
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=False))
    else:
        owner.register_buffer(attr, new)


def check_filled(module: "torch.nn.Module", path: str, what: str) -> None:
    """Every parameter and buffer must have left the meta device (our own per-parameter check)."""
    left = sorted(n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta)
    if left:
        raise MissingTensorError(file=path, tensor=left[0], hint=f"{len(left)} {what} tensor(s) were not filled "
                                 f"from the artifact: {', '.join(left[:10])}")
