"""Profile one greedy generation in-process (cProfile) with MTP k=ARGV[1] (0 = no speculation) on the shipped tiny model;
prints where a decode step's time goes. Used for benchmarks/results/acceptance_tiny_quiet.md."""
import os, sys, json, cProfile, pstats, io, time
os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
from vllm import LLM, SamplingParams
from vllm_deepseek_v4.assets import tiny_model_path
k = int(sys.argv[1])
prompts = [json.loads(l)["prompt"] for l in open("/work/main/src/vllm_deepseek_v4/assets/bench_prompts.jsonl")][:4]
kw = dict(model=tiny_model_path(), dtype="float32", enforce_eager=True, max_model_len=512)
if k:
    kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": k}
llm = LLM(**kw)
sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
llm.generate(prompts[:1], sp)
pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
for p in prompts:
    llm.generate([p], sp, use_tqdm=False)
pr.disable(); wall = time.perf_counter() - t
s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("cumulative").print_stats(45)
print(f"k={k} wall {wall:.2f}s for {len(prompts)}x64 tokens")
out = s.getvalue()
keep = [l for l in out.splitlines() if any(x in l for x in ("vllm_deepseek_v4", "gpu_model_runner", "cpu_model_runner", "sampler", "scheduler", "propose", "execute_model", "step", "function calls"))]
print("\n".join(keep[:60]))
