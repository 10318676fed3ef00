"""``dsv4 bench-acceptance PATH``: MTP acceptance and speed of an artifact through ``vllm serve``, plus a health check.

For K in ``--k`` and each draft sampling method (and a no-spec baseline) a fresh server is started (vLLM's
counters are server-wide), the fixed prompt set goes through ``/v1/completions`` one request at a time at each
temperature, and the spec-decode counters on ``/metrics`` are diffed around each batch. Reported per (K, drafting,
temperature): acceptance rate, per-position acceptance, mean acceptance length, tokens/s and speedup vs the
baseline; greedy texts are compared with the baseline's (speculative decoding must not change greedy output).

Drafting (``--draft-sample-method``, vLLM's ``draft_sample_method``): ``greedy`` proposes the draft's argmax, which
a target sampling at T > 0 accepts with probability ``p_target(draft)``; ``probabilistic`` samples the draft
token from the draft's own distribution and accepts it with ``min(1, p_target / p_draft)`` -- the same output
distribution, far more accepted tokens. At T = 0 vLLM drafts greedily whatever the setting, so those rows say
``greedy``. ``--expected`` adds the offline expectation of each row from the portable model, computed exactly
from the two distributions on the served token ids (``model/speculative.py`` ``expected_acceptance``).

Health: a draft whose greedy acceptance is near 0 is broken, not weak. The command says so (exit 1) and prints
the usual causes (``LIKELY_CAUSES``, numbered as in ``docs/prior-art.md`` §1), after checking the artifact with our
own load plan.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

DRAFTING = ("greedy", "probabilistic", "both")
BROKEN_BELOW = 0.05   # greedy acceptance under 5 %: the draft is not predicting the target at all

# How drafts that load without an error still accept nothing elsewhere (docs/prior-art.md §1, F1-F8).
LIKELY_CAUSES = [
    "F1: the draft's head/embed never loaded (top-level `head.weight`/`embed.weight` skipped by the MTP loader) "
    "-> random logits",
    "F2/F3: the draft built with the target's quant config (e.g. NVFP4/FP8 trunk, BF16 MTP on disk), or an ignore "
    "list that matches no runtime prefix -> wrong dequantisation",
    "F4: bare `.scale` FP8 companions not detected -> FP8 MTP weights read as BF16",
    "F5: `mtp.*` dropped or randomly initialised by a conversion (transformers save_pretrained drops `mtp.*`)",
    "F6: a DSpark-shaped `mtp.*` block half-loaded as a classic MTP layer",
    "F8: the wrong hidden state fed to the MTP (it must be the last main layer's 4-stream state before hc_head)",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-acceptance", help="MTP acceptance / speedup of an artifact through vllm serve",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="artifact directory (config.json + safetensors + tokenizer)")
    p.add_argument("--k", default="1,2,3", help="comma-separated numbers of speculative tokens (default 1,2,3)")
    p.add_argument("--temperatures", default="0,0.8", help="comma-separated temperatures (default 0,0.8)")
    p.add_argument("--prompts", default=None,
                   help="JSONL of {\"prompt\": ...} (default: the shipped held-out prompt set)")
    p.add_argument("--prompts-from-corpus", default=None, metavar="JSONL",
                   help="cut the prompts from the documents of a held-out corpus split instead (JSONL of "
                        "{\"text\": ...}, e.g. data/tiny_corpus/heldout.jsonl; never the training split); "
                        "--num-prompts prompts (default 32) of --prompt-chars characters")
    p.add_argument("--prompt-chars", type=int, default=320, help="characters per corpus prompt (default 320)")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--draft-sample-method", default="probabilistic", choices=DRAFTING,
                   help="how the MTP draft picks its tokens at temperature > 0: greedy (argmax), probabilistic "
                        "(sampled from the draft's distribution, accepted with min(1, p_target/p_draft)), or both "
                        "(a server for each); temperature-0 rows always draft greedily (default probabilistic)")
    p.add_argument("--expected", action="store_true",
                   help="also compute each row's expected acceptance offline (portable model in fp32 on the served "
                        "token ids; exact for k = 1 and for per-position acceptance at position 0)")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-spec server (no speedup, no parity)")
    p.add_argument("--per-prompt", action="store_true",
                   help="also read /metrics after every request and record per-prompt draft counters (JSON)")
    p.add_argument("--serve-args", default="--dtype float32 --max-model-len 512 --enforce-eager",
                   help="extra `vllm serve` arguments (one string)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default=None, help="where server logs go (default: a temp dir)")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report as JSON to this file")
    p.add_argument("--skip-verify", action="store_true", help="do not run our load-plan check first")
    p.add_argument("--server-cmd", default=None,
                   help="launch this command instead of `vllm serve` ({model} and {port} are filled in; "
                        "the spec config is appended); for custom launchers and tests")
    p.set_defaults(func=run)


def bench_args(path: str, **overrides: Any) -> argparse.Namespace:
    """The command's arguments for ``path`` with its own defaults, then ``overrides`` (for scripts that call
    :func:`bench` directly, so they never restate a default); an unknown name is an error."""
    ap = argparse.ArgumentParser(prog="dsv4")
    add_parser(ap.add_subparsers())
    args = ap.parse_args(["bench-acceptance", path])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise TypeError(f"bench_args: unknown option {name!r}")
        setattr(args, name, value)
    return args


# --- prompts ----------------------------------------------------------------------------------------------------
def default_prompts_path() -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / "bench_prompts.jsonl"


def load_prompts(path: str | os.PathLike | None, limit: int | None = None) -> list[str]:
    path = Path(path) if path else default_prompts_path()
    prompts = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{i}: expected a JSON object with a \"prompt\" field")
            prompts.append(str(row["prompt"]))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts[:limit] if limit else prompts


def prompts_from_corpus(docs: Iterable[str], *, n: int, chars: int = 320) -> list[str]:
    """``n`` deterministic, distinct prompts cut from held-out documents, round-robin over the documents: round
    ``r`` takes from every document long enough the ``chars`` characters at ``3 * r * chars``, moved back to a
    line start and cut at a line end. Raises if the documents hold fewer than ``n`` distinct pieces."""
    out: list[str] = []
    docs = [d for d in docs if len(d) > chars]
    for r in range(max((len(d) for d in docs), default=0) // (3 * chars) + 1):
        for doc in docs:
            start = 3 * r * chars
            if start + chars > len(doc):
                continue
            start = doc.rfind("\n", 0, start) + 1 if start else 0
            piece = doc[start:start + chars]
            piece = piece[: piece.rfind("\n") + 1] or piece
            if piece.strip() and piece not in out:
                out.append(piece)
            if len(out) == n:
                return out
    raise ValueError(f"prompts_from_corpus: the documents hold {len(out)} distinct {chars}-character prompts, "
                     f"{n} were asked for")


def corpus_prompts(path: str | os.PathLike, n: int, chars: int = 320) -> list[str]:
    """Prompts from a corpus split (JSONL of ``{"text": ...}``); a training split is refused by its name."""
    path = Path(path)
    if path.name.startswith("train"):
        raise ValueError(f"{path}: acceptance prompts must come from held-out text, not the training split")
    docs = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise ValueError(f"{path}:{i}: expected a JSON object with a \"text\" field")
                docs.append(str(row["text"]))
    return prompts_from_corpus(docs, n=n, chars=chars)


def select_prompts(args: Any) -> list[str]:
    """``--prompts`` (or the shipped set), or ``--prompts-from-corpus``; not both."""
    corpus = args.prompts_from_corpus
    if corpus and args.prompts:
        raise ValueError("--prompts and --prompts-from-corpus are exclusive")
    if corpus:
        return corpus_prompts(corpus, args.num_prompts or 32, args.prompt_chars)
    return load_prompts(args.prompts, args.num_prompts)


# --- one server configuration -------------------------------------------------------------------------------
def row_drafting(method: str | None, temperature: float) -> str | None:
    """The drafting a row really gets: vLLM drafts greedily for an all-greedy batch whatever the setting."""
    return None if method is None else "greedy" if temperature == 0 else method


def server_plan(ks: list[int], drafting: str, temps: list[float], baseline: bool) -> list[tuple[Any, Any, list]]:
    """``(k, draft_sample_method, temperatures)`` per server: the baseline (no spec) at every temperature; per K
    one server per method, a probabilistic server next to a greedy one only at T > 0 (T = 0 rows are greedy)."""
    methods = ["greedy", "probabilistic"] if drafting == "both" else [drafting]
    plan: list[tuple[Any, Any, list]] = [(None, None, temps)] if baseline else []
    for k in ks:
        for m in methods:
            mine = [t for t in temps if t > 0] if m == "probabilistic" and "greedy" in methods else temps
            if mine:
                plan.append((k, m, mine))
    return plan


def run_config(path: str, k: int | None, prompts: list[str], temperatures: list[float], args: Any,
               log_dir: str, bar: Any, method: str | None = None) -> dict[str, Any]:
    from .serve_client import Server, small_cpu_env
    extra = args.serve_args.split()
    if k is not None:
        extra += ["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": k,
                                                      "draft_sample_method": method})]
    tag = f"k{k}_{method}" if k is not None else "baseline"
    result: dict[str, Any] = {"k": k, "draft_sample_method": method, "by_temperature": {}}
    cmd = args.server_cmd.split() if args.server_cmd else None
    with Server(path, extra, log_path=os.path.join(log_dir, f"serve_{tag}.log"),
                start_timeout_s=args.start_timeout, cmd=cmd, env=small_cpu_env()) as server:
        server.complete(prompts[0], max_tokens=4, temperature=0.0, timeout=args.request_timeout)   # warm-up
        for temp in temperatures:
            before = server.spec_counters()
            texts, sequences, tokens, per_prompt, t0 = [], [], 0, [], time.perf_counter()
            last = before
            for j, prompt in enumerate(prompts):
                resp = server.complete(prompt, max_tokens=args.max_tokens, temperature=temp,
                                       seed=1234 + j if temp > 0 else None, timeout=args.request_timeout,
                                       return_token_ids=args.expected)
                texts.append(resp["choices"][0]["text"])
                if args.expected:
                    sequences.append([resp["choices"][0]["prompt_token_ids"], resp["choices"][0]["token_ids"]])
                tokens += int(resp["usage"]["completion_tokens"])
                if k is not None and args.per_prompt:
                    now = server.spec_counters()
                    per_prompt.append(now - last)
                    last = now
                bar.update(1)
            wall = time.perf_counter() - t0
            spec = (server.spec_counters() - before).summary() if k is not None else None
            result["by_temperature"][str(temp)] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                                                   "draft_sample_method": row_drafting(method, temp),
                                                   "spec": spec, "texts": texts}
            if sequences:
                result["by_temperature"][str(temp)]["sequences"] = sequences
            if per_prompt:     # per-request diffs; a step vLLM records after answering lands on the next request
                result["by_temperature"][str(temp)]["per_prompt"] = [
                    {"drafts": int(c.drafts), "draft_tokens": int(c.draft_tokens), "accepted": int(c.accepted)}
                    for c in per_prompt]
    return result


def health(report: dict[str, Any]) -> dict[str, Any]:
    """Broken if the greedy acceptance of any K is near 0, or greedy text changed under speculation."""
    problems = []
    for cfg in report["configs"]:
        if cfg["k"] is None:
            continue
        greedy = cfg["by_temperature"].get("0.0")
        if greedy and greedy["spec"]:
            rate = greedy["spec"]["acceptance_rate"]
            if rate is None:
                problems.append(f"k={cfg['k']}: no drafts were proposed (speculative decoding not active?)")
            elif rate < BROKEN_BELOW:
                problems.append(f"k={cfg['k']}: greedy acceptance {rate:.1%} is near 0 -> the draft is broken")
        if greedy and cfg.get("greedy_matches_baseline") is False:
            problems.append(f"k={cfg['k']}: greedy output differs from the no-spec baseline")
    return {"healthy": not problems, "problems": problems,
            "likely_causes": LIKELY_CAUSES if problems else []}


def bench(path: str, args: Any, prompts: list[str] | None = None) -> dict[str, Any]:
    """Run every configuration of ``args`` (see :func:`bench_args`); ``prompts`` if already selected."""
    import tempfile
    from tqdm import tqdm
    ks = [int(x) for x in args.k.split(",") if x.strip()]
    temps = [float(x) for x in args.temperatures.split(",") if x.strip()]
    if prompts is None:
        prompts = select_prompts(args)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="dsv4-bench-")
    os.makedirs(log_dir, exist_ok=True)
    plan = server_plan(ks, args.draft_sample_method, temps, not args.no_baseline)
    source = args.prompts_from_corpus or args.prompts or str(default_prompts_path())
    report: dict[str, Any] = {"path": os.path.abspath(path), "prompts": len(prompts), "prompt_source": source,
                              "max_tokens": args.max_tokens, "draft_sample_method": args.draft_sample_method,
                              "temperatures": temps, "serve_args": args.serve_args, "log_dir": log_dir, "configs": []}
    with tqdm(total=sum(len(t) for _, _, t in plan) * len(prompts), desc="bench-acceptance", unit="req",
              file=sys.stderr) as bar:
        for k, method, mine in plan:
            bar.set_postfix_str("baseline" if k is None else f"k={k} {method}")
            report["configs"].append(run_config(path, k, prompts, mine, args, log_dir, bar, method))
    base = next((c for c in report["configs"] if c["k"] is None), None)
    for cfg in report["configs"]:
        if cfg["k"] is None or base is None:
            continue
        for temp, r in cfg["by_temperature"].items():
            r["speedup"] = r["tokens_per_s"] / base["by_temperature"][temp]["tokens_per_s"]
        if "0.0" in cfg["by_temperature"]:
            cfg["greedy_matches_baseline"] = cfg["by_temperature"]["0.0"]["texts"] == base["by_temperature"]["0.0"]["texts"]
    report["health"] = health(report)
    if args.expected:
        add_expectations(path, report)
    return report


def add_expectations(path: str, report: dict[str, Any]) -> None:
    """Per spec row, from the portable model on the served sequences: ``expected_acceptance``, a one-token
    draft's acceptance at a random position (compare with the row's position-0 acceptance; binomial noise), and
    for k = 1 ``expected_on_tokens``, what vLLM's counters should read on exactly these tokens (greedy drafting:
    exactly; probabilistic: within the Bernoulli noise given the tokens)."""
    import torch

    from ..loader.load import load_model
    from ..model.speculative import expected_acceptance, expected_on_tokens
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    model.eval()
    for cfg in report["configs"]:
        for temp, r in cfg["by_temperature"].items():
            if cfg["k"] is None or not r.get("sequences") or not r["spec"] or not r["spec"]["drafts"]:
                continue
            seqs = [tuple(s) for s in r["sequences"]]
            want = expected_acceptance(model, seqs, float(temp), r["draft_sample_method"])
            r["expected_acceptance"] = want
            r["expected_sd"] = (want * (1 - want) / r["spec"]["drafts"]) ** 0.5    # of position 0's rate
            if cfg["k"] == 1:
                acc, drafts, var = expected_on_tokens(model, seqs, float(temp), r["draft_sample_method"])
                r["expected_on_tokens"] = {"accepted": acc, "drafts": drafts, "acceptance": acc / drafts,
                                           "sd": var ** 0.5 / drafts}


def format_table(report: dict[str, Any]) -> str:
    lines = ["| K | drafting | temp | acceptance | per position | expected pos. 0 (offline) | expected on these tokens "
             "(k=1) | mean acc. len | tokens/s | speedup | greedy = baseline |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in report["configs"]:
        for temp, r in cfg["by_temperature"].items():
            s = r["spec"] or {}
            rate = s.get("acceptance_rate")
            want, on = r.get("expected_acceptance"), r.get("expected_on_tokens")
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {:.1f} | {} | {} |".format(
                "none" if cfg["k"] is None else cfg["k"],
                "-" if cfg["k"] is None else r.get("draft_sample_method", "greedy"), temp,  # old reports: greedy
                "-" if rate is None else f"{rate:.1%}",
                " / ".join(f"{p:.1%}" for p in s.get("per_position", [])) or "-",
                "-" if want is None else f"{want:.1%} ± {2 * r['expected_sd']:.1%}",
                "-" if on is None else f"{on['acceptance']:.1%} ± {2 * on['sd']:.1%}",
                "-" if s.get("mean_acceptance_length") is None else f"{s['mean_acceptance_length']:.2f}",
                r["tokens_per_s"], f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                {True: "yes", False: "NO", None: "-"}[cfg.get("greedy_matches_baseline") if temp == "0.0" else None]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        prompts = select_prompts(args)          # bad prompt options fail before any server starts
    except (ValueError, OSError) as e:
        print(f"dsv4 bench-acceptance: {e}", file=sys.stderr)
        return 2
    if not args.skip_verify:
        from ..loader import build_plan
        plan = build_plan(args.path)
        problems = plan.problems()
        if problems:
            print(f"dsv4 bench-acceptance: {args.path} does not load cleanly; fix these first:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
    report = bench(args.path, args, prompts)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(format_table(report))
    h = report["health"]
    if h["healthy"]:
        print("health: OK")
        return 0
    print("health: BROKEN")
    for p in h["problems"]:
        print(f"  - {p}")
    print("likely causes (docs/prior-art.md §1):")
    for c in h["likely_causes"]:
        print(f"  - {c}")
    return 1
