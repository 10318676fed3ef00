"""Run records of ``benchmarks/`` and ``scripts/``: run metadata, JSON + markdown output.

Everything written here is meant to be committed, so paths are recorded relative to the repository checkout
(``repo_relative``): a file under the checkout by its relative path, one under the temporary directory as
``<tmp>/...``, anything else as ``<external>/NAME``. A result never names the machine's directories.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["REPO_ROOT", "meta", "portable", "repo_relative", "write", "write_json"]

# The checkout this package runs from (an editable install: src/vllm_deepseek_v4/devtools/records.py).
REPO_ROOT = Path(__file__).resolve().parents[3]


def repo_relative(path: str | os.PathLike[str]) -> str:
    """``path`` as a result file records it: relative to the checkout, ``<tmp>/...`` or ``<external>/NAME``."""
    p = Path(os.path.abspath(os.fspath(path)))
    for root, label in ((REPO_ROOT, ""), (Path(tempfile.gettempdir()), "<tmp>"), (Path("/tmp"), "<tmp>")):
        for base in {root, root.resolve()}:
            try:
                rel = p.relative_to(base)
            except ValueError:
                continue
            return "/".join(x for x in (label, rel.as_posix() if rel.parts else "") if x) or "."
    return f"<external>/{p.name}"


def portable(value: Any) -> Any:
    """``value`` (JSON-like) with every absolute path string rewritten by ``repo_relative``, also the path part
    of ``--opt=/abs/path`` arguments; anything else unchanged."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str):
        if value.startswith("/"):
            return repo_relative(value)
        opt, eq, rest = value.partition("=")
        if eq and opt.startswith("-") and rest.startswith("/"):
            return f"{opt}={repo_relative(rest)}"
    return value


def meta(argv: list[str] | None = None) -> dict[str, Any]:
    """git sha, python, CPU model and count, platform and the (portable) command line of this run."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=REPO_ROOT).stdout.strip()
    except OSError:
        sha = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return {"git_sha": sha, "python": platform.python_version(), "machine": f"{cpu} x{os.cpu_count()}",
            "platform": platform.platform(), "argv": portable(list(argv if argv is not None else sys.argv))}


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON at ``path`` (directories created), absolute paths made portable."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(portable(obj), fh, indent=1)


def write(out: str, meta_: dict[str, Any], rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    """``OUT.json`` (``{"meta", "rows"}``) and ``OUT.md`` (a title, the machine and a table of ``columns``)."""
    write_json(out + ".json", {"meta": meta_, "rows": rows})
    lines = [f"# {title}", "", f"Machine: {meta_['machine']}; git {meta_['git_sha']}; python {meta_['python']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(portable(r.get(c, ""))) for c in columns) + " |")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
