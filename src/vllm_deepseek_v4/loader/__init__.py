"""Load plan (strict accounting), expected parameter space, TP/EP sharding and streaming load."""
from __future__ import annotations

from .expected import ParamSpec, expected_params
from .plan import LoadPlan, build_plan
from .records import ParamPlan, Problem, Source

__all__ = ["ParamSpec", "expected_params", "LoadPlan", "ParamPlan", "Problem", "Source", "build_plan"]
