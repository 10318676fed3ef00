"""`make demo`: serve the shipped tiny DSv4 with its MTP draft through the unchanged `vllm serve` CLI.

Starts `vllm serve <model> --speculative-config '{"method":"mtp","num_speculative_tokens":K,
"draft_sample_method":"probabilistic"}'` on 127.0.0.1 (our plugin is picked up through its `vllm.general_plugins`
entry point), sends a few prompts greedily and then at T = 0.8, prints the greedy completions and the draft
acceptance of each pass read from the server's Prometheus `/metrics` (vLLM drafts greedily for greedy requests
and samples the draft from its own distribution at T > 0), and stops the server by its PID (always, also on
errors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from vllm_deepseek_v4.cli.serve_client import Server, small_cpu_env

PROMPTS = ["def fibonacci(n):\n", "The Python standard library", "import os\nimport sys\n\n\ndef main(",
           "class Stack:\n    \"\"\"A last-in first-out"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="artifact directory (default: the tiny model shipped in the package)")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8, help="the sampled pass (default 0.8)")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "dsv4-demo-serve.log"), help="server log file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from vllm_deepseek_v4.assets import tiny_model_path

        try:
            args.model = tiny_model_path()
        except FileNotFoundError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 2
    spec = json.dumps({"method": "mtp", "num_speculative_tokens": args.num_speculative_tokens,
                       "draft_sample_method": "probabilistic"})
    server = Server(model=args.model, port=args.port, log_path=args.log, start_timeout_s=args.start_timeout,
                    extra_args=["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                                "--speculative-config", spec],
                    # 1 GiB of KV cache, one OpenMP thread per process (unless the environment says otherwise).
                    env=small_cpu_env())
    print(f"starting vllm serve {args.model} (MTP, k={args.num_speculative_tokens}); log: {args.log}", flush=True)
    t0 = time.monotonic()
    with server:
        print(f"server pid {server.proc.pid} healthy on {server.base} after {time.monotonic() - t0:.0f} s\n")
        before = server.spec_counters()
        for prompt in PROMPTS:
            out = server.complete(prompt, max_tokens=args.max_tokens, temperature=0.0)
            print(f"--- prompt: {prompt!r}\n{prompt}{out['choices'][0]['text']}\n", flush=True)
        middle = server.spec_counters()
        for j, prompt in enumerate(PROMPTS):
            server.complete(prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=1234 + j)
        passes = {"greedy (T = 0, greedy drafting)": (middle - before).summary(),
                  f"T = {args.temperature} (probabilistic drafting)": (server.spec_counters() - middle).summary()}
    print(f"server (pid {server.proc.pid}) stopped, exit code {server.proc.returncode}")
    for name, stats in passes.items():
        rate = stats["acceptance_rate"]
        print(f"{name}: MTP drafts {stats['drafts']}, draft tokens {stats['draft_tokens']}, accepted "
              f"{stats['accepted']}; acceptance rate " + (f"{rate:.1%}" if rate is not None else "n/a (no drafts)") +
              ", per position: " + ", ".join(f"{r:.1%}" for r in stats["per_position"]) +
              (f", mean acceptance length: {stats['mean_acceptance_length']:.2f}" if stats["drafts"] else ""))
    return 0 if all(s["drafts"] > 0 for s in passes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
