"""Errors of vllm_deepseek_v4: every one names the file and tensor it is about.

The message reads ``"{file}: {tensor}: expected {expected}, found {found}. {hint}"`` (parts that are
empty are left out), and the keywords stay available as attributes so callers and tests can inspect them.
"""
from __future__ import annotations

__all__ = [
    "DSV4Error", "CheckpointError", "UnmappedTensorError", "AmbiguousRuleError", "TensorShapeError",
    "TensorDtypeError", "MissingTensorError", "QuantMismatchError", "KernelUnsupportedError",
    "ConfigError", "MTPLayoutError", "AliasMismatchError", "PlanError", "TensorValueError",
]


class DSV4Error(Exception):
    """Base class: a problem with an artifact, a config or a request that the user can act on."""

    def __init__(self, message: str = "", *, file: str | None = None, tensor: str | None = None,
                 expected: object = None, found: object = None, hint: str = "") -> None:
        self.file, self.tensor, self.expected, self.found, self.hint = file, tensor, expected, found, hint
        body = message
        if expected is not None or found is not None:
            body = (body + ": " if body else "") + f"expected {expected}, found {found}"
        # what is wrong, without the file and tensor it is about (a load plan files those separately)
        self.reason = f"{body}. {hint}" if body and hint else (body or hint)
        text = ": ".join([p for p in (file, tensor) if p] + ([body] if body else []))
        if hint:
            text = f"{text}. {hint}" if text else hint
        super().__init__(text)


class CheckpointError(DSV4Error):
    """A safetensors file or index is malformed, truncated or inconsistent."""


class UnmappedTensorError(DSV4Error):
    """A tensor on disk matches no naming rule."""


class AmbiguousRuleError(DSV4Error):
    """A tensor on disk matches more than one naming rule."""


class TensorShapeError(DSV4Error):
    """A tensor's shape differs from what the config implies."""


class TensorDtypeError(DSV4Error):
    """A tensor's dtype is not one its role allows."""


class MissingTensorError(DSV4Error):
    """A parameter the config implies has no source tensor."""


class QuantMismatchError(DSV4Error):
    """Quant companions are missing or disagree (e.g. FP8 weight without its scale)."""


class KernelUnsupportedError(DSV4Error):
    """A kernel was asked for shapes, dtypes or layouts it does not handle."""


class ConfigError(DSV4Error):
    """config.json is missing a field or holds an inconsistent value."""


class MTPLayoutError(DSV4Error):
    """The ``mtp.*`` block is absent, incomplete or shaped like something else (e.g. DSpark)."""


class AliasMismatchError(DSV4Error):
    """Two on-disk copies of one shared tensor (e.g. ``head.weight`` and ``mtp.0.head.weight``) disagree."""


class TensorValueError(DSV4Error):
    """A tensor holds values its role forbids: NaN/Inf floats, NaN codes of FP8/E8M0 bytes, scales <= 0,
    expert ids out of range. Reads ``"{tensor} in {file}: {found} (expected {expected})"``: one line per
    problem in ``dsv4 verify --values`` and the same text when a load refuses the tensor."""

    def __init__(self, *, file: str, tensor: str, expected: object, found: object) -> None:
        super().__init__(f"{tensor} in {file}: {found} (expected {expected})")
        self.file, self.tensor, self.expected, self.found = file, tensor, expected, found


class PlanError(DSV4Error):
    """The load plan could not account for every parameter and tensor; lists every problem found."""

    def __init__(self, problems: list[str], *, file: str | None = None) -> None:
        self.problems = sorted(problems)
        head = f"{len(self.problems)} problem(s) in the load plan"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems), file=file)
