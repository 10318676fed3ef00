"""Helpers for the vLLM plugin tests: seeded tiny artifacts in any layout, our portable reference (greedy
decode and an offline replay of vLLM's greedy MTP speculation), and in-process ``LLM`` engines.

Import this module before vLLM (it sets the HF offline switches); the in-process engine's vLLM variables
(``ENGINE_ENV``) are set only while an engine starts.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
# Only while an in-process engine starts (so `vllm serve` children of other tests keep vLLM's defaults).
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}

from vllm_deepseek_v4.devtools.artifacts import make_draft_agree_, to_convention, write_artifact  # noqa: E402
from tiny import make_config, make_model  # noqa: E402

from vllm_deepseek_v4.config import DSV4Config  # noqa: E402
from vllm_deepseek_v4.loader.expected import LINEAR, expected_params  # noqa: E402
from vllm_deepseek_v4.loader.load import load_model  # noqa: E402
from vllm_deepseek_v4.model import DSV4Model  # noqa: E402
from vllm_deepseek_v4.quant.numerics import quantize  # noqa: E402

FP32_PARTS = ("hc_", "attn_sink", "gate.bias", ".ape")        # fp32 in every published checkpoint
# canonical role -> on-disk suffix, where the upstream-style writers differ (compressed-tensors NVFP4)
ON_DISK_ROLE = {"nvfp4": {"weight": "weight_packed"}}
PROMPTS = [[3, 17, 42, 7, 99, 1, 250, 12, 5, 64, 33, 8, 200, 150, 9, 77, 31],
           [5, 6, 7], list(range(10, 52)), [400, 12, 9, 9, 9, 301, 44, 18]]


# ---- models ----
def agreeable(model: DSV4Model, eps: float = 0.15, eps_mtp: float | None = None,
              h_scale: float | None = None) -> DSV4Model:
    """Make ``mtp.0`` a good (not perfect) draft of a random model (``artifacts.make_draft_agree_``)."""
    make_draft_agree_(model.state_dict(), model.cfg, eps, eps_mtp, h_scale)
    return model


def on_disk_tensors(model: DSV4Model, schemes: dict[str, dict[str, str]] | None = None,
                    include_mtp: bool = True) -> dict[str, torch.Tensor]:
    """Upstream-named checkpoint tensors of ``model``: linears in ``schemes[part][group]`` (default bf16),
    hyper-connection / sink / bias / ape tensors fp32, everything else bf16."""
    sd = model.state_dict()
    schemes = schemes or {}
    out: dict[str, torch.Tensor] = {}
    for spec in expected_params(model.cfg, include_mtp=include_mtp):
        if spec.kind == LINEAR:
            scheme = schemes.get(spec.part, {}).get(spec.group, "bf16")
            for role, t in quantize(scheme, sd[f"{spec.name}.weight"].float()).items():
                out[f"{spec.name}.{ON_DISK_ROLE.get(scheme, {}).get(role, role)}"] = t
        else:
            t = sd[spec.name]
            out[spec.name] = t if not t.is_floating_point() else t.to(
                torch.float32 if any(p in spec.name for p in FP32_PARTS) else torch.bfloat16)
    return out


def write_model(path: Path | str, model: DSV4Model, *, convention: str = "upstream",
                schemes: dict[str, dict[str, str]] | None = None, include_mtp: bool = True,
                edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
                quantization_config: dict[str, Any] | None = None) -> Path:
    cfg = model.cfg.to_hf_dict()
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    t = to_convention(on_disk_tensors(model, schemes, include_mtp), convention, cfg)
    if edit is not None:
        edit(t)
    return write_artifact(path, t, cfg)


def seeded_model(seed: int = 0, *, agree: float | None = None) -> DSV4Model:
    """The tiny random model of ``tiny.py`` (ratios 0/4/8/4 + a sliding MTP layer, window 8, top-k 4)."""
    model = make_model(make_config(), seed=seed)
    return agreeable(model, eps=agree) if agree is not None else model


def zoo_layouts(tmp_path_factory: Any, model: DSV4Model, reference: Callable[[Path], tuple],
                *, check: bool = False) -> Callable[[str], tuple]:
    """``get(name)``: zoo layout ``name`` (``devtools.zoo``) of ``model``, written on first use (``check``: then
    ``zoo.check_layout`` without loading) and returned as ``(path, *reference(path))``, cached per name."""
    from vllm_deepseek_v4.devtools import zoo

    floats, raw_cfg, cfg = zoo.read_source(str(write_model(tmp_path_factory.mktemp("zoo_src"), model)))
    out = tmp_path_factory.mktemp("zoo")
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            path = out / name
            zoo.write_layout(path, name, floats, raw_cfg, cfg)
            if check:
                zoo.check_layout(path, name, load=False)
            cache[name] = (path, *reference(path))
        return cache[name]
    return get


# ---- the portable reference ----
def reference_model(path: Path | str, include_mtp: bool = True) -> DSV4Model:
    model, _ = load_model(str(path), dtype=torch.float32, progress=False, include_mtp=include_mtp)
    return model.eval()


@torch.no_grad()
def greedy(model: DSV4Model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``: prefill, then token-by-token decode with the model's own caches."""
    state = model.new_state()
    logits, _ = model(torch.tensor([prompt]), state)
    out: list[int] = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, _ = model(torch.tensor([[out[-1]]]), state)
    return out


@torch.no_grad()
def replay_acceptance(model: DSV4Model, prompt: list[int], greedy_tokens: list[int], k: int,
                      max_tokens: int) -> dict[str, Any]:
    """Offline replay of vLLM's greedy MTP speculation for a request with ``max_tokens`` output tokens.

    Each step drafts ``k`` tokens after the last accepted token ``s[n]`` -- step 1 from the trunk's streams
    at ``n - 1`` and ``s[n]`` (the draft's cache holds every accepted position), step ``j > 1`` from step
    ``j - 1``'s output streams and its drafted token -- and accepts the prefix that matches the greedy
    continuation, plus one bonus token; steps continue until ``max_tokens`` tokens exist. The last step may
    accept tokens past ``max_tokens`` (vLLM counts them, then truncates), so ``greedy_tokens`` must reach
    ``max_tokens + k``. Returns vLLM's counters: drafts, draft tokens, accepted (and per position).
    """
    if len(greedy_tokens) < max_tokens + k:
        raise ValueError(f"replay needs {max_tokens + k} greedy tokens, got {len(greedy_tokens)}")
    seq = list(prompt) + list(greedy_tokens)
    _, hidden = model(torch.tensor([seq]))
    P = len(prompt)
    n = P                                   # s[P] is the token sampled after prefill
    stats = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": [0] * k}
    while n - P + 1 < max_tokens:           # another step is scheduled while max_tokens is not reached
        state = model.new_mtp_state()
        logits, Z = model.forward_mtp(hidden[:, :n], torch.tensor([seq[1:n + 1]]), state)
        drafts = [int(logits[0, -1].argmax())]
        z = Z[:, -1:]
        for _ in range(k - 1):
            logits, z = model.forward_mtp(z, torch.tensor([[drafts[-1]]]), state)
            drafts.append(int(logits[0, -1].argmax()))
        a = 0
        while a < k and drafts[a] == seq[n + 1 + a]:
            a += 1
        stats["num_drafts"] += 1
        stats["num_draft_tokens"] += k
        stats["num_accepted_tokens"] += a
        for i in range(a):
            stats["accepted_per_pos"][i] += 1
        n += a + 1
    return stats


# ---- vLLM ----
@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread for an in-process engine, as vLLM intends for CPU serving. Its CPU worker replaces
    ``torch.set_num_threads`` with a no-op for the whole process, so the real one is put back on exit."""
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    set_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(before)


def make_llm(path: Path | str, k: int = 0, **kwargs: Any) -> Any:
    """An in-process engine on our plugin (eager, fp32, no tokenizer), MTP speculation with ``k`` drafts."""
    with _env(ENGINE_ENV):
        return _make_llm(path, k, **kwargs)


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _make_llm(path: Path | str, k: int, **kwargs: Any) -> Any:
    from vllm import LLM

    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    args: dict[str, Any] = dict(model=str(path), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                                max_model_len=256, max_num_seqs=8, disable_log_stats=False, seed=0,
                                speculative_config=spec)
    args.update(kwargs)
    return LLM(**args)


@contextmanager
def engine(path: Path | str, k: int = 0, **kwargs: Any) -> Iterator[Any]:
    """``make_llm`` that is shut down and released on exit (several engines run in one test process)."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    kwargs.setdefault("kv_cache_memory_bytes", 64 << 20)
    try:
        llm = make_llm(path, k, **kwargs)
    except BaseException:
        gc.collect()
        cleanup_dist_env_and_memory()             # a failed start-up must not poison the next engine
        raise
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def on_worker(llm: Any, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(worker)`` in the (single, in-process) worker and return its result."""
    return llm.collective_rpc(fn)[0]


def generate(llm: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def spec_counters(llm: Any) -> dict[str, Any]:
    """vLLM's speculative-decoding counters (cumulative over the engine's life)."""
    out: dict[str, Any] = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": []}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:spec_decode_")
        if name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            out[name] = int(m.value)
        elif name == "num_accepted_tokens_per_pos":
            out["accepted_per_pos"] = [int(v) for v in m.values]
    return out


def diff_counters(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    prev = before["accepted_per_pos"] or [0] * len(after["accepted_per_pos"])
    out["accepted_per_pos"] = [a - b for a, b in zip(after["accepted_per_pos"], prev)]
    return out


def sum_counters(items: list[dict[str, Any]], k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                           "accepted_per_pos": [0] * k}
    for it in items:
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            out[key] += it[key]
        out["accepted_per_pos"] = [a + b for a, b in zip(out["accepted_per_pos"], it["accepted_per_pos"])]
    return out


def load_registered_native(path: Path | str) -> tuple[Any, dict[str, Any], dict[str, set[str]]]:
    """The plugin's registered native classes (CPU stand-ins: the ``nvidia`` base) for the artifact at ``path``:
    each built by vLLM's ``initialize_model`` (target, then MTP with the draft's model config) and loaded by its
    own ``load_weights`` from vLLM's safetensors iterator over the shards. Returns the vLLM config, the models
    and the names each ``load_weights`` reported, by kind (``target`` / ``mtp``)."""
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_deepseek_v4.native.build import ensure_distributed, make_vllm_config
    from vllm_deepseek_v4.native.standins import cpu_standins
    from vllm_deepseek_v4.vllm_plugin import native_classes as nc

    files = sorted(str(p) for p in Path(path).glob("*.safetensors"))
    models: dict[str, Any] = {}
    loaded: dict[str, set[str]] = {}
    with cpu_standins():
        vc = make_vllm_config(str(path), native=False)
        ensure_distributed(vc)
        for kind, cls, mc in (("target", nc.NativeDeepseekV4ForCausalLM, vc.model_config),
                              ("mtp", nc.NativeDeepSeekV4MTP, vc.speculative_config.draft_model_config)):
            with set_default_torch_dtype(mc.dtype), torch.device("cpu"):
                models[kind] = initialize_model(vc, model_class=cls, model_config=mc)
            loaded[kind] = models[kind].load_weights(safetensors_weights_iterator(files, False))
    return vc, models, loaded


def cfg_of(path: Path | str) -> DSV4Config:
    from vllm_deepseek_v4.config import load_config
    return load_config(str(path))


__all__ = ["PROMPTS", "agreeable", "on_disk_tensors", "write_model", "seeded_model", "reference_model", "greedy",
           "replay_acceptance", "make_llm", "engine", "on_worker", "generate", "spec_counters", "diff_counters",
           "sum_counters", "load_registered_native", "zoo_layouts", "cfg_of"]
