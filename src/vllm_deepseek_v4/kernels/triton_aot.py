"""Launching Triton kernels, and compiling them for a GPU that is not here.

Every kernel launch of ``moe_triton`` / ``attention_triton`` goes through :func:`launch`. Inside
:func:`recording` launches are collected instead of run, so a CPU-only machine can take the exact launches
a wrapper would make (same specialisation, constexprs, warps and stages) and build them for Hopper with
:func:`compile_launch`: Triton's bundled ``ptxas`` turns them into sm_90a cubins and reports registers,
spills and shared memory. That catches kernels that work in the interpreter but cannot build for the GPU,
and shows whether weight loads came out 16 bytes wide, before any GPU time is spent. The binder and
``_pack_args`` calls mirror ``JITFunction.run`` of triton 3.9 (internal API: other versions may differ).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton

__all__ = ["Launch", "CompileReport", "launch", "recording", "compile_launch"]


@dataclass
class Launch:
    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.kernel.fn.__name__)


@dataclass
class CompileReport:
    name: str
    arch: str
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    sass: dict[str, int] = field(default_factory=dict)   # opcode family -> count (static, whole kernel)

    def row(self) -> dict[str, Any]:
        return {"kernel": self.name, "arch": self.arch, "registers": self.registers, "spill_bytes": self.spill_bytes,
                "stack_bytes": self.stack_bytes, "shared_bytes": self.shared_bytes, **self.sass}


_recorded: list[Launch] | None = None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or record it inside :func:`recording`."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect launches instead of running them (outputs stay unwritten)."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


_SASS_FAMILIES = {
    "ldg_128": r"LDG\.E\.128", "ldg_64": r"LDG\.E\.64", "ldg_narrow": r"LDG\.E(?:\.U8|\.S8|\.U16|\.S16)?\s",
    "ldgsts_128": r"LDGSTS\.E\.(?:BYPASS\.)?(?:LTC128B\.)?128", "ldgsts": r"LDGSTS",
    "wgmma": r"HGMMA", "mma": r"HMMA", "ffma": r"FFMA", "lop3": r"LOP3", "f2f": r"F2F|F2FP", "total": r"^\s+/\*[0-9a-f]{4}\*/",
}


def _sass_counts(cubin: bytes, arch: int) -> dict[str, int]:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return {k: len(re.findall(p, sass, flags=re.M)) for k, p in _SASS_FAMILIES.items()}


def compile_launch(rec: Launch, arch: int = 90) -> CompileReport:
    """Build one recorded launch for ``sm_<arch>`` (a, for Hopper) exactly as the runtime would specialise it."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = rec.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {"debug": False, **rec.kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*rec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True)
    text = log.stdout + log.stderr
    if log.returncode != 0:
        raise RuntimeError(f"ptxas failed for {rec.name}: {text[-2000:]}")

    def grab(pattern: str) -> int:
        hit = re.search(pattern, text)
        return int(hit.group(1)) if hit else 0

    return CompileReport(rec.name, sm, grab(r"Used (\d+) registers"), grab(r"(\d+) bytes spill stores"),
                         grab(r"(\d+) bytes stack frame"), int(compiled.metadata.shared),
                         _sass_counts(compiled.asm["cubin"], arch))
