"""Value checks: what a tensor's bytes may hold, by its role, checked while the tensor is in memory anyway.

Headers say nothing about values: a NaN in a BF16 weight, an E4M3 NaN code, an E8M0 scale byte 0xFF, a zero
global scale or an expert id past ``n_routed_experts`` all plan and load, and the model serves garbage (or a
hash layer indexes out of bounds on its first forward). Every load path streams each tensor once (the
portable ``iter_plan_tensors``, the plugin's ``PlanRouter``, the native loader), so each checks it there;
``dsv4 verify --values`` (``stream.scan_values``) reads every planned tensor once to check them all without
building a model.

What a role may hold comes from its ``quant.scheme`` record (role kind, safetensors dtype, scale encoding):

- float tensors (BF16 weights, ``hc_*`` mixers, norms, biases, every ``mtp.*`` float): finite;
- F8_E4M3 bytes: FP8 weight codes without a NaN code (0x7F / 0xFF; e4m3fn has no Inf); NVFP4 local scales
  also without a set sign bit (0x80-0xFF: negative, or -0, which no quantizer writes: it scales ``amax >= 0``).
  A zero local scale (0x00) is legal: quantizers write it for an all-zero block;
- E8M0 scale bytes (F8_E8M0, or U8 under an ``e8m0`` encoding): no 0xFF (NaN); 0x00 is 2^-127, a number;
- float block scales (``weight_scale_inv``, W4A16 group scales) and global scales: finite and > 0.
  compressed-tensors divides by its ``weight_global_scale``, ModelOpt multiplies by ``weight_scale_2``:
  zero is invalid for either (a division by zero, or a module of zeros);
- packed FP4 nibbles and int4 words: every code is a number, nothing to check;
- hash-routing ``tid2eid``: expert ids in ``[0, n_routed_experts)``.

Each check is one reduction over the tensor (``aminmax``/``max``: NaN propagates through both, no
temporary); only a tensor that fails is scanned again to count the bad values and find the first one. The
first index is the flat index in the *on-disk* tensor (a slice of a fused or stacked tensor maps its index
back through the source's ops). ``DSV4_SKIP_VALUE_CHECKS=1`` (or ``check_values=False``) turns the checks
off; whoever does so gets one line on stderr saying values were not checked.
"""
from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING, NamedTuple

from ..errors import ConfigError, TensorValueError
from ..quant.scheme import CODES, GLOBAL, SCALES, SCHEMES
from .expected import INDEX

if TYPE_CHECKING:
    import torch

    from .plan import LoadPlan
    from .records import AnySource, ParamPlan

__all__ = ["SKIP_ENV", "ValueCheck", "value_checks_enabled", "value_check", "plan_checks", "alias_problem"]

SKIP_ENV = "DSV4_SKIP_VALUE_CHECKS"
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

# check kinds
FINITE, E4M3, E4M3_SCALE, E8M0, POSITIVE, EXPERT_ID = "finite", "e4m3", "e4m3_scale", "e8m0", "positive", "expert_id"
_BYTE_CODES = (E4M3, E4M3_SCALE, E8M0)
_FLOATS = frozenset({"BF16", "F16", "F32", "F64"})


def value_checks_enabled(path: str, override: bool | None = None, *, why: str = "") -> bool:
    """Whether a load of ``path`` checks values: ``override`` if given, else not ``DSV4_SKIP_VALUE_CHECKS``.

    Turned off, it prints one line to stderr saying so (``why`` names the switch). A value of the variable
    that is neither on nor off is refused rather than guessed."""
    if override is None:
        raw = os.environ.get(SKIP_ENV, "")
        if raw.strip().lower() not in _ON + _OFF:
            raise ConfigError(f"environment variable {SKIP_ENV}", expected=f"one of {', '.join(_ON + _OFF[1:])} "
                              "or unset", found=repr(raw))
        override = raw.strip().lower() not in _ON
        why = f"{SKIP_ENV}={raw}"
    if not override:
        print(f"dsv4: {path}: tensor values NOT checked ({why or 'value checks off'}): NaN/Inf weights, NaN "
              "scale codes, scales <= 0 and out-of-range expert ids load unnoticed", file=sys.stderr, flush=True)
    return override


def check_kind(pp: "ParamPlan", role: str, dtype: str) -> str | None:
    """The check a role's tensor gets (one of the kinds above), or None when every bit pattern is valid."""
    if pp.quant is None:
        if pp.spec.kind == INDEX:
            return EXPERT_ID
        return FINITE if dtype in _FLOATS else None
    scheme = SCHEMES[pp.quant.scheme]
    kind = scheme.role(role).kind
    if dtype == "F8_E4M3":
        return E4M3_SCALE if kind == SCALES else E4M3   # NVFP4 local scales; FP8 weight codes
    if kind == CODES:
        return FINITE if dtype in _FLOATS else None   # bf16 weights; packed fp4 / int4 codes are all numbers
    if kind == SCALES:
        if dtype == "F8_E8M0" or (dtype == "U8" and scheme.scale_encoding == "e8m0"):
            return E8M0
        return POSITIVE if dtype in _FLOATS else None
    if kind == GLOBAL:
        return POSITIVE if dtype in _FLOATS else None
    return None                                       # int4 zero points, w4a16 weight_shape


def _expected(kind: str, dtype: str, role: str, pp: "ParamPlan", n_experts: int) -> str:
    if kind == FINITE:
        return f"finite {dtype} values"
    if kind == E4M3:
        return "F8_E4M3 codes that are numbers (bytes 0x7F and 0xFF are NaN)"
    if kind == E4M3_SCALE:
        return "F8_E4M3 scale codes 0x00-0x7E (0x7F is NaN; 0x80-0xFF have the sign bit set)"
    if kind == E8M0:
        return "E8M0 exponent bytes 0x00-0xFE (0xFF is NaN)"
    if kind == EXPERT_ID:
        return f"expert ids in [0, {n_experts}) (n_routed_experts)"
    op = SCHEMES[pp.quant.scheme].global_op(role) if pp.quant is not None else None
    how = {"divide": "; compressed-tensors divides by it", "multiply": "; ModelOpt multiplies by it"}.get(op or "", "")
    return f"finite {role} values > 0{how}"


class ValueCheck(NamedTuple):
    """The check of one planned source (a whole on-disk tensor, or the slice ``ops`` of one)."""

    kind: str
    tensor: str                     # on-disk name
    file: str                       # shard, relative to the artifact
    key: str                        # canonical key the source fills
    disk_shape: tuple[int, ...]
    ops: tuple[tuple, ...]
    expected: str
    n_experts: int

    def problem(self, t: "torch.Tensor", ops: tuple[tuple, ...] | None = None) -> TensorValueError | None:
        """The error for ``t`` (the source after its ops), or None when every value is allowed.

        ``ops``: the ops that cut ``t`` from the on-disk tensor when they are not the plan's own (a TP rank's
        slice appended); they place the first bad value in the on-disk tensor."""
        import torch
        if t.numel() == 0 or self.fine(t):
            return None
        bad = self._bad(t).reshape(-1)
        count = int(bad.sum())
        if count == 0:                  # the fast test and the exact one disagree: cannot happen, say so
            raise AssertionError(f"{self.tensor}: {self.kind} fast check failed but no value is bad")
        first = int(bad.view(torch.uint8).argmax())     # the first True (argmax of bool is not implemented)
        value = t.reshape(-1)[first]
        what = self._what(t, bad, count, value)
        ops = self.ops if ops is None else tuple(ops)
        where = f" in the slice for {self.key}" if ops else ""
        index = self._disk_index(first, tuple(t.shape), ops)
        return TensorValueError(file=self.file, tensor=self.tensor, expected=self.expected,
                                found=f"{what}{where}, first at flat index {index} ({_show(value, self.kind)})")

    def check(self, t: "torch.Tensor", ops: tuple[tuple, ...] | None = None) -> None:
        """Raise ``TensorValueError`` if ``t`` holds a value its role forbids (``ops``: see ``problem``)."""
        err = self.problem(t, ops)
        if err is not None:
            raise err

    # -- the one-reduction test, the exact mask --
    def fine(self, t: "torch.Tensor") -> bool:
        """True when every value of ``t`` (the tensor, or any part of it) is allowed: one or two reductions."""
        import torch
        if t.numel() == 0:
            return True
        if self.kind == E4M3_SCALE:                    # small tensors: one reduction and one search
            return int(t.view(torch.uint8).max()) < 0x80 and not _has_byte(t.contiguous(), 0x7F)
        if self.kind in (E4M3, E8M0):
            if t.is_contiguous():               # libc memchr: ~1 us a call (a thousand small e8m0 scales)
                return not (_has_byte(t, 0xFF) or (self.kind == E4M3 and _has_byte(t, 0x7F)))
            u = t.view(torch.uint8)
            if int(u.max()) == 0xFF:
                return False
            return self.kind == E8M0 or int(u.view(torch.int8).max()) != 0x7F
        lo, hi = torch.aminmax(t.reshape(-1))          # NaN propagates into both
        lo, hi = float(lo), float(hi)
        if self.kind == FINITE:
            return math.isfinite(lo) and math.isfinite(hi)
        if self.kind == POSITIVE:
            return lo > 0 and math.isfinite(hi)
        return lo >= 0 and hi < self.n_experts         # EXPERT_ID

    def _bad(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch
        if self.kind == E4M3:
            return (t.view(torch.uint8) & 0x7F) == 0x7F
        if self.kind == E4M3_SCALE:
            return (t.view(torch.uint8) >= 0x80) | (t.view(torch.uint8) == 0x7F)
        if self.kind == E8M0:
            return t.view(torch.uint8) == 0xFF
        if self.kind == FINITE:
            return ~torch.isfinite(t)
        if self.kind == POSITIVE:
            return ~(torch.isfinite(t) & (t > 0))
        return (t < 0) | (t >= self.n_experts)

    def _what(self, t: "torch.Tensor", bad: "torch.Tensor", count: int, value: "torch.Tensor") -> str:
        import torch
        if self.kind == FINITE:
            nan = int(torch.isnan(t).sum())
            return f"{count} non-finite value{'s' * (count > 1)} ({nan} NaN, {count - nan} Inf)"
        if self.kind in (E4M3, E8M0):
            return f"{count} NaN code{'s' * (count > 1)}"
        if self.kind == E4M3_SCALE:
            nan = int((t.view(torch.uint8) == 0x7F).sum())
            return f"{count} bad scale code{'s' * (count > 1)} ({nan} NaN, {count - nan} negative or -0)"
        if self.kind == POSITIVE:
            return f"{count} value{'s' * (count > 1)} not finite and > 0"
        return f"{count} expert id{'s' * (count > 1)} outside [0, {self.n_experts})"

    def _disk_index(self, flat: int, shape: tuple[int, ...], ops: tuple[tuple, ...]) -> int:
        """``flat`` in the slice -> flat index in the on-disk tensor (through a meta view: no data)."""
        if not ops:
            return flat
        import torch

        from .ops import apply_ops
        view = apply_ops(torch.empty(self.disk_shape, device="meta"), ops)
        idx = []
        for n in reversed(shape):
            flat, i = divmod(flat, n)
            idx.append(i)
        return view.storage_offset() + sum(i * s for i, s in zip(reversed(idx), view.stride()))


_MEMCHR = None


def _has_byte(t: "torch.Tensor", byte: int) -> bool:
    """Whether the bytes of contiguous ``t`` hold ``byte``: the C library's ``memchr`` over its storage, which
    costs a fraction of a torch reduction's dispatch on the many small scale tensors of a checkpoint."""
    global _MEMCHR
    if _MEMCHR is None:
        import ctypes
        fn = ctypes.CDLL(None).memchr                  # this process's C library
        fn.restype, fn.argtypes = ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
        _MEMCHR = fn
    return _MEMCHR(t.data_ptr(), byte, t.numel() * t.element_size()) is not None


def _show(value: "torch.Tensor", kind: str) -> str:
    if kind in _BYTE_CODES:
        import torch
        return f"byte 0x{int(value.reshape(1).view(torch.uint8)[0]):02X}"
    return f"{value.item():g}" if value.is_floating_point() else str(int(value))


def value_check(plan: "LoadPlan", pp: "ParamPlan", role: str, src: "AnySource") -> ValueCheck | None:
    """The check of ``src`` filling ``role`` of ``pp``, or None when its dtype has no invalid values."""
    kind = check_kind(pp, role, src.dtype)
    if kind is None:
        return None
    n = plan.cfg.n_routed_experts
    key = pp.spec.name if pp.quant is None else f"{pp.spec.name}.{role}"
    info = plan.checkpoint.tensors[src.tensor]
    return ValueCheck(kind, src.tensor, src.file, key, tuple(info.shape), tuple(getattr(src, "ops", ()) or ()),
                      _expected(kind, src.dtype, role, pp, n), n)


def plan_checks(plan: "LoadPlan") -> dict[tuple[str, str], ValueCheck]:
    """``(on-disk tensor, canonical key) -> check`` for every planned source that has one (for loaders that
    meet tensors by name: vLLM's weight iterator, the native loader)."""
    out: dict[tuple[str, str], ValueCheck] = {}
    for pp in plan.params.values():
        for role, src in pp.roles.items():
            vc = value_check(plan, pp, role, src)
            if vc is not None:
                out[(src.tensor, vc.key)] = vc
    return out


def alias_problem(key: str, primary: "AnySource", t: "torch.Tensor", alias: "AnySource",
                  a: "torch.Tensor") -> TensorValueError | None:
    """A copy of a shared tensor must hold exactly the primary's values (after casting: fp32 copies of bf16)."""
    if tuple(a.shape) != tuple(t.shape):
        return TensorValueError(file=alias.file, tensor=alias.tensor, expected=f"the shape of {primary.tensor}",
                                found=f"shape {list(a.shape)}, not {list(t.shape)}")
    import torch
    if t.numel() == 0:
        return None
    d = (a.float() - t.float()).abs().reshape(-1)
    diff = float(d.max())
    if diff == 0.0:
        return None
    bad = ~(d == 0)                                  # NaN counts as different
    first = int(bad.view(torch.uint8).argmax())
    return TensorValueError(file=alias.file, tensor=alias.tensor, expected=f"the values of {primary.tensor} "
                            f"({key}), of which it is a copy",
                            found=f"{int(bad.sum())} values differ, max abs difference {diff:g}, first at flat "
                                  f"index {first}")
