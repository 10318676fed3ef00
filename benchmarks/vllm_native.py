"""vLLM's own DeepSeek-V4 classes, stock vs native loading, per zoo layout (and the published Flash layout).

For every layout of the zoo written from the vLLM-geometry model (``scripts/vllm_geometry_model.py`` then
``scripts/build_zoo.py SRC OUT``) this runs ``check_vllm`` (``dsv4 check-vllm``) and puts side by side, for the
target ``DeepseekV4ForCausalLM`` and the ``DeepSeekV4MTP`` draft:

- **native** (our plan -> vLLM's parameters): parameters filled / total, uncovered, tensors left unused (with a
  reason), errors, and the draft's quant methods;
- **stock** (vLLM 0.32's unmodified ``load_weights``, quant config derived from the artifact, the target's
  object for the draft): parameters loaded / total, tensors skipped, parameters left unloaded, the exception,
  and the draft's quant methods.

``--flash`` adds the published DeepSeek-V4-Flash layout (``vllm_deepseek_v4.devtools.flash``: 69,187 real
headers, sparse data) checked with ``dsv4 check-vllm --device meta --json`` in a child process, timed (wall
and peak RSS). Every path recorded is repo-relative (``devtools.records``).

    python benchmarks/vllm_native.py [--zoo DIR] [--device meta|cpu] [--flash] [--out benchmarks/results/vllm_native]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_zoo(base: Path) -> Path:
    for cmd in ([sys.executable, str(ROOT / "scripts/vllm_geometry_model.py"), str(base / "geo")],
                [sys.executable, str(ROOT / "scripts/build_zoo.py"), str(base / "geo"), str(base / "zoo"), "--no-load"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return base / "zoo"


def _methods(methods: dict[str, str] | None) -> str:
    """The draft's quant-method classes, by kind (linear / experts), as ``Class xN``."""
    if not methods:
        return ""
    by: dict[str, Counter[str]] = {"linear": Counter(), "experts": Counter()}
    for mod, cls in methods.items():
        if mod.endswith(("embed_tokens", "shared_head.head", "lm_head", "ffn.gate")):
            continue
        by["experts" if mod.endswith(("routed_experts", ".experts")) else "linear"][cls] += 1
    return "; ".join(f"{k}: " + ", ".join(f"{c} x{n}" for c, n in sorted(v.items())) for k, v in by.items() if v)


def _short(s: str | None, n: int = 140) -> str:
    if not s:
        return ""
    s = s.replace("|", "/").replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _scrub(doc: Any, path: Path) -> Any:
    """``doc`` with the artifact's absolute directory inside any message replaced by its portable form."""
    from vllm_deepseek_v4.devtools.records import repo_relative

    text = json.dumps(doc)
    for p in {str(path), str(path.resolve())}:
        text = text.replace(p, repo_relative(p))
    return json.loads(text)


def row(layout: str, doc: dict[str, Any], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"layout": layout, "native_ok": doc.get("ok"), "seconds": round(seconds, 2),
                           "problems": [_short(p, 300) for p in doc.get("problems", [])]}
    for kind in ("target", "mtp"):
        j = doc.get(kind)
        if j is not None:
            out[f"native_{kind}"] = f"{j['covered']}/{j['params']}"
            out[f"native_{kind}_uncovered"] = len(j["uncovered"])
            out[f"native_{kind}_unused"] = len(j["unused"])
            out[f"native_{kind}_padding"] = len(j["padding"])
            out[f"native_{kind}_errors"] = len(j["errors"])
            out[f"native_{kind}_detail"] = {"uncovered": j["uncovered"][:10], "errors": j["errors"][:10],
                                            "unused": j["unused"][:10], "padding": j["padding"][:10],
                                            "shared": j.get("shared", {})}
        s = doc.get("stock", {}).get(kind, {})
        if s:
            out[f"stock_{kind}"] = "" if s.get("loaded") is None else f"{s['loaded']}/{s['params']}"
            out[f"stock_{kind}_skipped"] = len(s.get("skipped") or [])
            out[f"stock_{kind}_unloaded"] = None if s.get("unloaded") is None else len(s["unloaded"])
            out[f"stock_{kind}_error"] = _short(s.get("exception"))
            out[f"stock_{kind}_detail"] = {"unloaded": (s.get("unloaded") or [])[:20],
                                           "skipped": (s.get("skipped") or [])[:10]}
    out["first_problem"] = _short(out["problems"][0], 160) if out["problems"] else ""
    out["native_mtp_quant"] = _methods((doc.get("mtp") or {}).get("quant_methods"))
    own = {k: (doc.get(k) or {}).get("own_kernels") or {} for k in ("target", "mtp")}
    out["native_own_kernels"] = "; ".join(
        f"{k}: " + ", ".join(f"{mod} x{n}" for mod, n in
                             sorted(Counter(".".join(m.split(".")[-2:]) for m in v).items()))
        for k, v in own.items() if v)
    out["stock_mtp_quant"] = _methods(doc.get("stock", {}).get("mtp", {}).get("quant_methods"))
    return out


def run_zoo(zoo: Path, device: str) -> list[dict[str, Any]]:
    from vllm_deepseek_v4.native import check_vllm

    rows = []
    for d in sorted(p for p in zoo.iterdir() if (p / "config.json").is_file()):
        t0 = time.perf_counter()
        try:
            doc = check_vllm(str(d), device=device)
        except Exception as e:           # a benchmark records, never hides, a crash
            doc = {"ok": False, "problems": [f"check_vllm raised {type(e).__name__}: {e}"]}
        rows.append(row(d.name, _scrub(doc, d), time.perf_counter() - t0))
        print(f"{d.name:26s} native {rows[-1].get('native_target', '-')} / {rows[-1].get('native_mtp', '-')} "
              f"ok={rows[-1]['native_ok']}  stock {rows[-1].get('stock_target', '-')} / "
              f"{rows[-1].get('stock_mtp', '-')}  {rows[-1]['seconds']} s", flush=True)
    return rows


def run_flash(base: Path) -> dict[str, Any]:
    """``dsv4 check-vllm --device meta --json`` on the sparse Flash layout, in a child process: wall time and
    the child's peak RSS."""
    from vllm_deepseek_v4.devtools import flash

    d = base / "flash"
    flash.materialise(d)
    cmd = [sys.executable, "-m", "vllm_deepseek_v4.cli.main", "check-vllm", str(d), "--device", "meta", "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {"ok": False, "problems": [f"exit {r.returncode}: {_short(r.stderr[-600:], 600)}"]}
    out = row("DeepSeek-V4-Flash (sparse, meta)", _scrub(doc, d), seconds)
    out.update({"exit_code": r.returncode, "tensors": len(flash.inventory()), "peak_rss_mb": round(peak_mb)})
    return out


COLUMNS = ["layout", "native_ok", "native_target", "native_mtp", "native_mtp_unused", "native_mtp_quant",
           "native_own_kernels",
           "stock_target", "stock_target_error", "stock_mtp", "stock_mtp_unloaded", "stock_mtp_error",
           "stock_mtp_quant", "seconds", "first_problem"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="an existing zoo directory (default: write one into a temp dir)")
    ap.add_argument("--device", choices=("meta", "cpu"), default="cpu",
                    help="cpu (default): native loads values (the zoo is small); meta: headers only")
    ap.add_argument("--flash", action="store_true", help="also check the published Flash layout (meta, timed)")
    ap.add_argument("--no-zoo", action="store_true", help="only the Flash layout")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vllm_native"))
    args = ap.parse_args()

    from vllm_deepseek_v4.devtools import records

    with tempfile.TemporaryDirectory(prefix="vllm_native_") as tmp:
        base = Path(tmp)
        rows: list[dict[str, Any]] = []
        if not args.no_zoo:
            zoo = Path(args.zoo) if args.zoo else build_zoo(base)
            rows += run_zoo(zoo, args.device)
        if args.flash:
            rows.append(run_flash(base))
            f = rows[-1]
            print(f"Flash: ok={f['native_ok']} exit={f['exit_code']} {f['seconds']} s peak {f['peak_rss_mb']} MB "
                  f"target {f.get('native_target')} mtp {f.get('native_mtp')}", flush=True)
    meta = records.meta()
    meta["device"] = args.device
    import vllm

    meta["vllm"] = getattr(vllm, "__version__", "")
    records.write(args.out, meta, rows, COLUMNS,
                  f"vLLM's own DeepSeek-V4 classes: stock vs native loading (zoo on {args.device})")
    _append_notes(args.out + ".md")
    return 0 if all(r["native_ok"] or r["layout"] == "hf_transformers" for r in rows) else 1


NOTES = """
Columns: `native_target` / `native_mtp` = vLLM parameters filled (or shared with the target) / parameters of
the class, through our plan (NVFP4 modules: the 8 missing in the trunk, 2 in an NVFP4 draft, are
vLLM-only activation global scales that weight-only NVFP4 never carries, written as 1.0 and listed as padding
in the JSON); `native_mtp_unused` = tensors on disk the draft does not load, each with a written
reason in the JSON (duplicated head/embed copies, explained tensors). `seconds`: native + stock checks
(the first row also pays vLLM's import; the Flash row is a child process, headers only, both checks). `stock_*` = vLLM 0.32's own
`load_weights` with the quant config vLLM derives from the artifact (the target's object for the draft):
parameters loaded / total, parameters left unloaded (the draft's `embed_tokens` and `shared_head.head`: vLLM's
proposer replaces `shared_head.head` with the target's `lm_head` at any PP and `embed_tokens` only at PP = 1, so
at PP > 1 stock serves a draft embedding nobody loaded), the exception. `native_own_kernels`: modules whose
format vLLM's DSv4 forward has no kernel for, run by ours (`native/draft_kernels.py`: an NVFP4 `attn.wo_a`,
which vLLM's `o_proj` would `bmm` as packed bytes; our Triton decode at load, vLLM's `bmm` after).
`hf_transformers` is refused by design (transformers' `save_pretrained` dropped `mtp.*`; the plan says so).
"""


def _append_notes(md: str) -> None:
    with open(md, "a") as fh:
        fh.write(NOTES)


if __name__ == "__main__":
    sys.exit(main())
