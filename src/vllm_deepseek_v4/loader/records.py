"""The load plan's records: where each parameter's tensors come from, and what is wrong with an artifact.

Plain records, shared by the planning steps (``account``, ``plan``, ``config_check``) and by the code that
reads a plan (``stream``, ``sharding``, the vLLM plugin) without any of them importing another's logic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Union

from ..checkpoint.format import TensorInfo
from ..quant.detect import ModuleQuant
from .expected import ParamSpec

__all__ = ["Source", "AnySource", "ParamPlan", "Problem", "part_of", "UNMAPPED", "UNEXPECTED", "EXTRA_MTP_LAYER",
           "MISSING", "MTP_DROPPED", "NAMING", "MTP_ONLY", "DUPLICATE", "SHAPE", "DTYPE", "QUANT", "ALIAS_SHAPE",
           "FOREIGN_MTP", "CONFIG"]


class Source(NamedTuple):
    """A slice of an on-disk tensor (after ``ops``) that fills a parameter role.

    A whole tensor fills a role as its ``TensorInfo``, which reads the same (``tensor``, ``dtype``, ``shape``,
    ``file``, ``ops == ()``): 69k whole tensors in Flash, no copy of each. The first four fields sit where
    ``TensorInfo`` has name, dtype, shape and file, so one positional getter reads either (``getter``).
    """

    tensor: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    ops: tuple[tuple, ...] = ()


assert Source._fields[1:4] == TensorInfo._fields[1:4] == ("dtype", "shape", "file")


AnySource = Union[Source, TensorInfo]       # what fills a role: a slice, or a whole tensor


class ParamPlan(NamedTuple):
    """How one expected parameter is filled: its scheme (linears) and the source of each role.

    A named tuple: Flash plans 35k of them, built in bulk."""

    spec: ParamSpec
    roles: dict[str, AnySource]
    quant: ModuleQuant | None = None
    aliases: tuple[AnySource, ...] = ()   # extra copies of a shared tensor: compared when loading

    @property
    def scheme(self) -> str:
        return self.quant.scheme if self.quant else ""


# Problem kinds. The first three are reported as "unmapped" tensors, the next two as "missing" parameters,
# the rest as errors (``inspect --json``).
UNMAPPED = "unmapped"                 # the tensor matches no naming rule
UNEXPECTED = "unexpected"             # it names a parameter this config does not have
EXTRA_MTP_LAYER = "extra_mtp_layer"   # it sits in an MTP layer beyond num_nextn_predict_layers
MISSING = "missing"                   # no tensor fills an expected parameter
MTP_DROPPED = "mtp_dropped"           # no tensor of the MTP block at all (a transformers save drops mtp.*)
NAMING = "naming"                     # several naming rules match; or a fused tensor does not cut into its parts
MTP_ONLY = "mtp_only"                 # an MTP-only tensor (e_proj, enorm, ...) in a main layer
DUPLICATE = "duplicate"               # several tensors fill one parameter
SHAPE = "shape"                       # a plain tensor of another shape than the config implies
DTYPE = "dtype"                       # a plain tensor of a dtype its role does not allow
QUANT = "quant"                       # a linear module's tensors fit no quant scheme
ALIAS_SHAPE = "alias_shape"           # a copy of the shared embed/head shaped differently from the primary
FOREIGN_MTP = "foreign_mtp"           # the mtp.* block is not a DeepSeek-V4 MTP layer (a DSpark drafter)
CONFIG = "config"                     # a config.json field the tensors contradict (named once, with the evidence)

_AS_UNMAPPED = frozenset({UNMAPPED, UNEXPECTED, EXTRA_MTP_LAYER})
_AS_MISSING = frozenset({MISSING, MTP_DROPPED})


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an artifact. Callers decide on ``kind`` and ``part``; ``reason`` is for people.

    ``part`` is ``main``, ``mtp.K``, or ``mtp.*`` for the MTP block as a whole. ``tensor`` is the on-disk
    tensor, or the canonical parameter for a missing or twice-filled one; ``file`` holds the tensor ("" for
    a parameter).
    """

    kind: str
    part: str
    tensor: str
    file: str
    reason: str

    @property
    def report(self) -> str:
        """The list of the report this problem is filed under: ``unmapped``, ``missing`` or ``errors``."""
        return "unmapped" if self.kind in _AS_UNMAPPED else "missing" if self.kind in _AS_MISSING else "errors"

    @property
    def text(self) -> str:
        """``file: tensor: reason`` (empty parts left out), as in ``inspect --json`` errors."""
        return ": ".join(p for p in (self.file, self.tensor, self.reason) if p)

    @property
    def line(self) -> str:
        """One line for ``dsv4 verify``."""
        if self.report == "unmapped":
            return f"{self.file}: {self.tensor}: unmapped: {self.reason}"
        if self.report == "missing":
            return f"{self.tensor}: missing: {self.reason}"
        return self.text

    def as_json(self) -> str | dict[str, str]:
        if self.report == "unmapped":
            return {"name": self.tensor, "file": self.file, "reason": self.reason}
        if self.report == "missing":
            return {"param": self.tensor, "reason": self.reason}
        return self.text


_MTP_PREFIX = re.compile(r"(?:model\.)?mtp\.(\d+)\.")


def part_of(name: str) -> str:
    """The part a canonical name, or an on-disk name spelled ``[model.]mtp.K.``, belongs to: ``mtp.K`` or ``main``."""
    m = _MTP_PREFIX.match(name)
    return f"mtp.{m.group(1)}" if m else "main"
