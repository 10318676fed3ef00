"""``dsv4 compare A B [--ids 3,17,42,...] [--json] [--no-mtp]``: how far apart two artifacts compute.

Both artifacts are planned (headers only) first, so a bad artifact or a vocabulary mismatch fails before any
weight is read. Then each is loaded through its plan in fp32 compute, run on the same token ids (main model,
then the MTP draft fed with *its own* main model's pre-``hc_head`` streams and the ids shifted by one) and
freed before the other is loaded, so peak memory is one model plus the logits.

Exit codes: 0 both loaded and compared (whatever the distance: judging it is the user's call); 1 an artifact
does not load (a tensor value check failed, too: ``loader.values``), the two cannot be compared (different
vocabularies), or either's logits hold NaN/Inf (no distance is printed then: ``max_abs_diff: nan`` reads like
a number); 2 usage (bad ``--ids``); 3 no such path. ``--no-value-checks`` loads without the value checks (a
line on stderr says so); non-finite logits still fail.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..config import DSV4Config

# fields that change the logits' shape: comparing is meaningless when they differ
_MUST_MATCH = ("vocab_size",)
_NOT_COMPARED = {"quantization_config", "dialect", "torch_dtype"}     # formats, not architecture


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="load two artifacts and report how far their main and MTP logits are apart")
    p.add_argument("a", help="reference artifact directory")
    p.add_argument("b", help="artifact to compare with it")
    p.add_argument("--ids", type=parse_ids, default=None, metavar="3,17,42,...",
                   help="comma-separated token ids (at least 2); default: a fixed sequence long enough to fill "
                        "the sliding window and the compressors")
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    p.add_argument("--no-mtp", action="store_true", help="compare the main model only")
    p.add_argument("--no-value-checks", action="store_true", help="load without checking tensor values "
                   "(NaN/Inf, NaN scale codes, scales > 0, expert ids); off by default, said on stderr when used")
    p.set_defaults(func=run)


def parse_ids(text: str) -> list[int]:
    """``"3,17,42"`` -> ``[3, 17, 42]``; argparse turns the error into a usage error (exit 2)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None
    if len(ids) < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 token ids (the MTP draft reads the next token), "
                                         f"found {len(ids)}")
    return ids


def default_ids(cfg: "DSV4Config") -> list[int]:
    """A fixed pseudo-random sequence (no tokenizer): twice the longest of window and compress ratio, plus 8,
    so the window slides, every compressor emits entries and the indexer has entries to select from."""
    span = max([cfg.window_size, *cfg.compress_ratios])
    n, x, out = 2 * span + 8, 12345, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31          # the C library LCG: fixed across platforms and versions
        out.append(x % cfg.vocab_size)
    return out


def config_differences(a: "DSV4Config", b: "DSV4Config") -> list[str]:
    """``"field: A vs B"`` for every architecture field that differs."""
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(a)
            if f.name not in _NOT_COMPARED and getattr(a, f.name) != getattr(b, f.name)]


def run_artifact(plan: Any, ids: "torch.Tensor", *, mtp: bool, progress: bool,
                 check_values: bool | None = None) -> dict[str, "torch.Tensor"]:
    """Load through ``plan`` in fp32 and return ``{"main": [S, V], "mtp.k": [S-1-k, V]}`` logits."""
    import torch

    from ..loader.load import load_model

    model, _ = load_model(plan.path, dtype=torch.float32, include_mtp=mtp, progress=progress, plan=plan,
                          check_values=check_values)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        main, hidden = model(ids)
        out["main"] = main[0]
        for k in range(model.cfg.n_mtp_layers if mtp else 0):
            # draft k reads the streams of the previous stage at p and the token at p + 1 + k
            hidden = hidden[:, :-1]
            logits, hidden = model.forward_mtp(hidden, ids[:, 1 + k:], model.new_mtp_state(), k=k)
            out[f"mtp.{k}"] = logits[0]
    del model
    return out


def distance(a: "torch.Tensor", b: "torch.Tensor") -> dict[str, Any]:
    """Max / mean absolute difference, max relative to A's largest logit, and top-1 agreement over positions."""
    d = (a - b).abs()
    scale = float(a.abs().max()) or 1.0
    return {"positions": int(a.shape[0]), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "max_rel_diff": float(d.max()) / scale,
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def require_finite(logits: "torch.Tensor", which: str, path: str) -> None:
    """Non-finite logits make every distance NaN (or Inf): a failure naming the side, not a number."""
    import torch

    from ..errors import TensorValueError
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        pos = int(bad.any(-1).to(torch.uint8).argmax())
        raise TensorValueError(file=path, tensor=f"{which} logits", expected="finite logits to compare",
                               found=f"{int(bad.sum())} non-finite values ({int(torch.isnan(logits).sum())} NaN), "
                                     f"first at token position {pos}")


def compare(path_a: str, path_b: str, ids: list[int] | None, *, mtp: bool = True,
            progress: bool = False, check_values: bool | None = None) -> dict[str, Any]:
    """The whole comparison as the ``--json`` document. Raises ``DSV4Error`` when either cannot be loaded or
    either side's logits are not finite."""
    import torch

    from ..errors import ConfigError
    from ..loader.plan import build_plan

    for p in (path_a, path_b):
        if not os.path.exists(p):
            raise FileNotFoundError(f"no such artifact: {p}")
    plans = [build_plan(p, include_mtp=mtp) for p in (path_a, path_b)]
    for plan in plans:
        plan.raise_if_bad()
    ca, cb = plans[0].cfg, plans[1].cfg
    for name in _MUST_MATCH:
        if getattr(ca, name) != getattr(cb, name):
            raise ConfigError(f"{path_a} vs {path_b}", expected=f"the same {name}",
                              found=f"{getattr(ca, name)} vs {getattr(cb, name)}",
                              hint="logits over different vocabularies cannot be compared")
    ids = ids if ids is not None else default_ids(ca)
    bad = [i for i in ids if not 0 <= i < ca.vocab_size]
    if bad:
        raise IdsError(f"--ids: expected token ids in [0, {ca.vocab_size}) (vocab_size of {path_a}), "
                       f"found {bad[:8]}{' ...' if len(bad) > 8 else ''}")
    t = torch.tensor([ids], dtype=torch.long)
    out_a = run_artifact(plans[0], t, mtp=mtp, progress=progress, check_values=check_values)
    out_b = run_artifact(plans[1], t, mtp=mtp, progress=progress, check_values=check_values)
    for out, path in ((out_a, path_a), (out_b, path_b)):
        for key, logits in out.items():
            require_finite(logits, key, path)
    report: dict[str, Any] = {"a": path_a, "b": path_b, "positions": len(ids),
                              "naming": [plans[0].naming, plans[1].naming],
                              "quant": [plans[0].quant_report(), plans[1].quant_report()],
                              "config_differences": config_differences(ca, cb)}
    for key in out_a:
        if key in out_b:
            report["main" if key == "main" else key] = distance(out_a[key], out_b[key])
    if "mtp.0" in report:
        report["mtp"] = report.pop("mtp.0")
    return report


class IdsError(ValueError):
    """``--ids`` holds tokens outside the vocabulary (a usage error, exit 2)."""


def _human(rep: dict[str, Any]) -> str:
    lines = [f"A: {rep['a']} (naming {rep['naming'][0]})", f"B: {rep['b']} (naming {rep['naming'][1]})",
             f"{rep['positions']} token positions, fp32 compute", "",
             f"{'logits':8s} {'positions':>9s} {'max_abs_diff':>13s} {'mean_abs_diff':>13s} {'max_rel':>9s} "
             f"{'top1_agree':>10s}"]
    for key in ["main", "mtp"] + sorted(k for k in rep if k.startswith("mtp.")):
        if key in rep:
            r = rep[key]
            lines.append(f"{key:8s} {r['positions']:9d} {r['max_abs_diff']:13.6g} {r['mean_abs_diff']:13.6g} "
                         f"{r['max_rel_diff']:9.2e} {r['top1_agreement']:10.4f}")
    if rep["quant"][0] != rep["quant"][1]:
        for side, q in zip("AB", rep["quant"]):
            lines.append(f"quant {side}: " + "; ".join(f"{part}: " + ", ".join(f"{g}={s}" for g, s in groups.items())
                                                      for part, groups in q.items()))
    for d in rep["config_differences"]:
        lines.append(f"note: configs differ: {d}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        rep = compare(args.a, args.b, args.ids, mtp=not args.no_mtp, progress=sys.stderr.isatty(),
                      check_values=False if args.no_value_checks else None)
    except IdsError as e:
        print(f"dsv4 compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(_human(rep))
    return 0
