"""Stream an artifact through its load plan: one canonical tensor at a time, never a list of all weights.

``iter_plan_tensors`` yields ``(key, tensor)`` in canonical names: ``{module}.{role}`` for linear modules,
the full name for plain tensors. Fused sources are sliced by their ``ops``; copies of the shared
``embed``/``head`` are compared with the primary and only the primary is yielded.

Every yielded tensor owns its memory: its bytes are read with one positional read (``os.preadv``) straight
into a fresh tensor at the offsets the scan validated. (``safe_open.get_tensor`` in safetensors >= 0.6
returns tensors that view the file's memory map: nothing is read until first use, the model would depend on
the file staying unchanged, and copying out of the map page by page is slower than one read.) Leading
``select``/``narrow`` ops (an expert of a stacked tensor, half of a fused projection) become a smaller byte
range, so only the bytes a piece needs are read. Peak extra memory is one source tensor.

Every tensor's values are checked as it is read (``loader.values``); ``scan_values`` is ``dsv4 verify
--values``: every planned tensor read once into one reused buffer, every problem listed.
"""
from __future__ import annotations

import ctypes
import math
import os
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from ..errors import AliasMismatchError, CheckpointError, TensorValueError
from .ops import apply_ops
from .values import alias_problem, value_check, value_checks_enabled

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint, TensorInfo
    from .plan import LoadPlan, Source
    from .records import AnySource
    from .values import ValueCheck

__all__ = ["iter_plan_tensors", "apply_ops", "plan_keys", "PositionalReader", "scan_values", "ScanResult"]


def plan_keys(plan: "LoadPlan") -> list[str]:
    """Every canonical key the plan fills, in streaming order."""
    return [key for name, pp in plan.params.items() for key in _keys(name, pp)]


def _keys(name: str, pp) -> list[str]:
    return [name] if pp.quant is None else [f"{name}.{role}" for role in pp.roles]


def iter_plan_tensors(plan: "LoadPlan", *, progress: bool = True, atol: float = 0.0,
                      check_values: bool | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield every planned tensor once, in canonical names. Raises if the plan is not ``ok``.

    Each tensor's values are checked by its role before it is yielded (``loader.values``: NaN/Inf, NaN codes,
    scales <= 0, expert ids), a ``TensorValueError`` naming tensor and file on the first bad one.
    ``check_values``: None follows ``DSV4_SKIP_VALUE_CHECKS``; False turns the checks off (one line on stderr)."""
    from tqdm import tqdm

    plan.raise_if_bad()
    checking = value_checks_enabled(plan.path, check_values,
                                    why="turned off by the caller: check_values=False, dsv4 compare --no-value-checks")
    total = sum(len(pp.roles) for pp in plan.params.values())
    bar = tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False)
    with PositionalReader(plan.checkpoint) as reader:
        for name, pp in plan.params.items():
            for role, src in pp.roles.items():
                t = reader.read_source(src, check=value_check(plan, pp, role, src) if checking else None)
                key = name if pp.quant is None else f"{name}.{role}"
                for alias in pp.aliases:
                    _compare(key, src, t, alias, reader.read_source(alias), atol)
                bar.update(1)
                yield key, t
    bar.close()


# ---- dsv4 verify --values: every planned tensor read once, every problem listed ----
class ScanResult(NamedTuple):
    problems: list[TensorValueError]
    tensors: int                     # planned sources read (aliases included)
    nbytes: int                      # bytes read


def scan_values(plan: "LoadPlan", *, progress: Callable[[int, int, int, int], None] | None = None) -> ScanResult:
    """Read every planned source once and check it (every problem, not just the first). Memory: one reused
    buffer of the largest tensor, plus a fresh copy of each alias while it is compared with its primary.

    ``progress(done_tensors, total_tensors, done_bytes, total_bytes)`` is called after each tensor."""
    import torch

    plan.raise_if_bad()
    jobs = [(key, value_check(plan, pp, role, src), src, pp.aliases) for name, pp in plan.params.items()
            for key, (role, src) in zip(_keys(name, pp), pp.roles.items())]
    total = len(jobs) + sum(len(aliases) for *_, aliases in jobs)
    total_bytes = sum(_nbytes(plan, s) for _, _, src, aliases in jobs for s in (src, *aliases))
    problems: list[TensorValueError] = []
    done = nbytes = 0
    buf = torch.empty(max((plan.checkpoint.tensors[src.tensor].nbytes for _, _, src, _ in jobs), default=0),
                      dtype=torch.uint8)
    with PositionalReader(plan.checkpoint) as reader:
        for key, vc, src, aliases in jobs:
            t, err = reader.read_checked(src, vc, buf=buf)
            found = [err]
            found += [alias_problem(key, src, t, alias, reader.read_source(alias)) for alias in aliases]
            problems += [err for err in found if err is not None]
            done += 1 + len(aliases)
            nbytes += sum(_nbytes(plan, s) for s in (src, *aliases))
            if progress is not None:
                progress(done, total, nbytes, total_bytes)
    return ScanResult(problems, done, nbytes)


def _nbytes(plan: "LoadPlan", src: "AnySource") -> int:
    """Bytes of the piece ``src`` (its share of the on-disk tensor's bytes)."""
    info = plan.checkpoint.tensors[src.tensor]
    return info.nbytes if not src.ops else info.nbytes * math.prod(src.shape) // max(1, info.numel)


class PositionalReader:
    """Reads planned sources into owned tensors, one ``os.preadv`` per tensor (or leading slice of one).

    One file descriptor per shard, opened on first use; a shard whose size changed since the scan is refused
    (the offsets would be stale).
    """

    def __init__(self, checkpoint: "Checkpoint") -> None:
        self.ckpt = checkpoint
        self._files: dict[str, tuple[int, int]] = {}       # file -> (fd, data-region start)

    def __enter__(self) -> "PositionalReader":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def read_source(self, src: "Source", *, buf: "torch.Tensor | None" = None,
                    check: "ValueCheck | None" = None) -> "torch.Tensor":
        """``src.tensor`` after ``src.ops``, contiguous and owning exactly its own bytes.

        ``buf``: a uint8 tensor to read into instead (the result then views it, valid until the next read
        into it): a scan that drops every tensor reuses one buffer instead of faulting in fresh pages.
        ``check``: the source's value check (``loader.values``); a bad value raises ``TensorValueError``."""
        t, err = self.read_checked(src, check, buf=buf)
        if err is not None:
            raise err
        return t

    def read_checked(self, src: "Source", check: "ValueCheck | None", *, buf: "torch.Tensor | None" = None
                     ) -> tuple["torch.Tensor", "TensorValueError | None"]:
        """``read_source`` returning the value problem instead of raising it.

        The fast test (one reduction) runs on the bytes as read; only a tensor that fails it is scanned again
        for the message (count, first index). A piece cut by ops other than a leading range is checked after
        its ops."""
        info = self.ckpt.tensors[src.tensor]
        t, rest, fine = self._read(info, src.ops, buf, check)
        if rest:
            t = apply_ops(t, rest).contiguous()
            if buf is None and t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()                  # a view of a bigger read: keep only its own bytes
        if check is None or fine:
            return t, None
        return t, check.problem(t)

    def read(self, info: "TensorInfo", ops: tuple[tuple, ...] = (), *,
             buf: "torch.Tensor | None" = None) -> tuple["torch.Tensor", tuple[tuple, ...]]:
        """Read ``info`` (or the byte range its leading ``select``/``narrow`` ops pick); returns the tensor and
        the ops still to apply. ``buf``: see ``read_source``."""
        t, rest, _ = self._read(info, ops, buf, None)
        return t, rest

    def _read(self, info: "TensorInfo", ops: tuple[tuple, ...], buf: "torch.Tensor | None",
              check: "ValueCheck | None") -> tuple["torch.Tensor", tuple[tuple, ...], bool]:
        """``read``, plus whether ``check``'s fast test passed on the bytes read (False: not run, or failed)."""
        import torch

        from ..checkpoint.format import TORCH_DTYPE_NAMES

        path = os.path.join(self.ckpt.root, info.file)
        dtype = getattr(torch, TORCH_DTYPE_NAMES.get(info.dtype, ""), None)
        if dtype is None:
            raise CheckpointError(f"no torch {torch.__version__} dtype for this safetensors code", file=path,
                                  tensor=info.name, expected=f"one of {sorted(TORCH_DTYPE_NAMES)}", found=info.dtype)
        shape = list(info.shape)
        if dtype == getattr(torch, "float4_e2m1fn_x2", None):
            shape[-1] //= 2                                 # torch counts packed pairs
            offset, rest = 0, ops                           # sub-byte rows: no range arithmetic
        else:
            offset, shape, rest = _leading_range(shape, dtype.itemsize, ops)
        nbytes = math.prod(shape) * dtype.itemsize
        if buf is not None and buf.numel() >= nbytes:
            out = buf[:nbytes].view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        if nbytes:
            fd, data_start = self._open(path, info)
            self._pread(fd, out, nbytes, data_start + info.start + offset, path, info)
        return out, rest, check is not None and not rest and check.fine(out)

    def _open(self, path: str, info: "TensorInfo") -> tuple[int, int]:
        got = self._files.get(info.file)
        if got is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError("cannot open the shard", file=path, tensor=info.name, hint=str(e)) from e
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            want = self.ckpt.files.get(info.file)
            if size != want or len(head) != 8:
                os.close(fd)
                raise CheckpointError("file changed since it was scanned", file=path, tensor=info.name,
                                      expected=f"{want} bytes", found=f"{size} bytes")
            got = self._files[info.file] = (fd, 8 + int.from_bytes(head, "little"))
        return got

    @staticmethod
    def _pread(fd: int, out: "torch.Tensor", nbytes: int, pos: int, path: str, info: "TensorInfo") -> None:
        buf = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
        done = 0
        while done < nbytes:                     # a single read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [buf[done:]], pos + done)
            if n <= 0:
                raise CheckpointError("file ended inside the tensor's data", file=path, tensor=info.name,
                                      expected=f"{nbytes} bytes at offset {pos}", found=f"{done} bytes")
            done += n


def _leading_range(shape: list[int], itemsize: int, ops: tuple[tuple, ...]) -> tuple[int, list[int], tuple[tuple, ...]]:
    """Fold leading ``select(0, i)`` / ``narrow(0, a, n)`` ops of a row-major tensor into a byte offset and a
    smaller shape: they pick one contiguous range. Returns ``(offset, shape, remaining ops)``."""
    offset, shape = 0, list(shape)
    for k, op in enumerate(ops):
        if not shape or op[0] not in ("select", "narrow") or op[1] != 0:
            return offset, shape, ops[k:]
        row = math.prod(shape[1:]) * itemsize
        if op[0] == "select" and 0 <= op[2] < shape[0]:
            offset, shape = offset + op[2] * row, shape[1:]
        elif op[0] == "narrow" and 0 <= op[2] and op[3] >= 0 and op[2] + op[3] <= shape[0]:
            offset, shape = offset + op[2] * row, [op[3], *shape[1:]]
        else:                                  # out of range: let torch raise on the full tensor
            return offset, shape, ops[k:]
    return offset, shape, ()


def _compare(key: str, src: "Source", t: "torch.Tensor", alias: "Source", a: "torch.Tensor", atol: float) -> None:
    """Aliased copies of a shared tensor must hold the same values (after casting: fp32 copies of bf16 heads)."""
    import torch
    if a.shape != t.shape:
        raise AliasMismatchError(file=alias.file, tensor=alias.tensor, expected=f"shape {list(t.shape)} of {src.tensor}",
                                 found=list(a.shape))
    diff = (a.float() - t.float()).abs().max().item() if t.numel() else 0.0
    if not diff <= atol:
        raise AliasMismatchError(file=alias.file, tensor=alias.tensor, expected=f"the values of {src.tensor} "
                                 f"({key})", found=f"max abs difference {diff:g}",
                                 hint="two copies of a shared tensor disagree; which one the draft should use is unknown")
    del torch
