"""Load plan (strict accounting), expected parameter space, TP/EP sharding and streaming load."""
from __future__ import annotations

from .expected import ParamSpec, expected_params
from .plan import LoadPlan, ParamPlan, Source, build_plan

__all__ = ["ParamSpec", "expected_params", "LoadPlan", "ParamPlan", "Source", "build_plan"]
