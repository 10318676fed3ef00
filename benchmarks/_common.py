"""Shared benchmark plumbing: timing statistics, run metadata, JSON + markdown output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def timeit(fn: Callable[[], Any], *, repeat: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]
    return {"median_s": statistics.median(ts), "p20_s": q(0.2), "p80_s": q(0.8), "n": len(ts)}


def meta(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    return {"git_sha": sha, "python": platform.python_version(), "machine": f"{cpu} x{os.cpu_count()}",
            "platform": platform.platform(), "argv": argv if argv is not None else sys.argv}


def write(out: str, meta_: dict[str, Any], rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump({"meta": meta_, "rows": rows}, fh, indent=1)
    lines = [f"# {title}", "", f"Machine: {meta_['machine']}; git {meta_['git_sha']}; python {meta_['python']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
