"""One real HTTP round trip: the unchanged `vllm serve` CLI on 127.0.0.1 with `--speculative-config` mtp.

The artifact carries the shipped tiny tokenizer (vocab 4096) over a seeded agreeable model, so text goes in
and out. Prompts are sent as token ids; the greedy completion must decode to exactly the text of our
portable greedy tokens, the server's /metrics must show MTP drafts and acceptances, and the server is stopped
by its PID (bounded waits throughout).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import vllm_support as vs
from tiny import make_config, make_model
from vllm_deepseek_v4.cli.serve_client import SMALL_CPU_ENV, Server

pytestmark = pytest.mark.slow
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "src", "vllm_deepseek_v4", "assets", "tiny")
N = 24


def test_vllm_serve_with_mtp_answers_over_http_and_stops_by_pid(tmp_path):
    from transformers import PreTrainedTokenizerFast

    model = vs.agreeable(make_model(make_config(vocab_size=4096), seed=3), eps=0.15)
    path = vs.write_model(tmp_path / "model", model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), path / name)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    prompts = [tok("def fibonacci(n):\n")["input_ids"], tok("The Python standard library")["input_ids"]]
    ref = vs.reference_model(path)
    with torch.no_grad():
        want = [tok.decode(vs.greedy(ref, p, N), skip_special_tokens=True) for p in prompts]

    server = Server(model=str(path), log_path=str(tmp_path / "serve.log"), start_timeout_s=600,
                    extra_args=["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                                "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}'],
                    env={**SMALL_CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})            # vLLM's default engine process
    with server:
        pid = server.proc.pid
        name = server.served_model()
        got = [complete_ids(server, name, p) for p in prompts]
        stats = server.spec_counters().summary()
    assert got == want
    assert stats["drafts"] > 0 and stats["draft_tokens"] == 2 * stats["drafts"] and stats["accepted"] > 0
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def complete_ids(server: Server, name: str, prompt_ids: list[int]) -> str:
    from vllm_deepseek_v4.cli.serve_client import http_json

    out = http_json(server.base + "/v1/completions", {"model": name, "prompt": prompt_ids, "max_tokens": N,
                                                      "temperature": 0.0, "ignore_eos": True}, timeout=300)
    return out["choices"][0]["text"]
