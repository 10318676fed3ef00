"""`vllm serve` under load: the shipped tiny model with MTP k = 2, fp32, greedy, over real HTTP.

One server per KV pool size. On each: 64 good requests of mixed prompt lengths (2..250 tokens, some decoding
past position 256, across block boundaries of the CSA and HCA layers' window caches, 48 and 112 tokens a block
for this model) and output lengths are fired at once, together with bad requests
(prompt longer than the context, invalid sampling parameters, unknown model, out-of-vocabulary token ids,
invalid JSON) and streaming requests whose client closes the socket halfway. Then:

- every good request's token ids equal its sequential output (the same requests sent one at a time to the first
  server before any load);
- every bad request got a 4xx with a non-empty message;
- ``/health`` answers, nothing is left running or waiting and no KV block stays allocated (a dropped stream
  that leaked its slot would show here), and a sequential subset reproduces its outputs afterwards.

The second server has a KV pool of a few blocks, so requests queue and running ones are preempted and
recomputed; ``vllm:num_preemptions_total`` must be positive (the test cannot pass without preemption).
Each server is stopped by its PID.
"""
from __future__ import annotations

import http.client
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from vllm_deepseek_v4.assets import tiny_model_path
from vllm_deepseek_v4.cli.serve_client import SMALL_CPU_ENV, Server, parse_prometheus

pytestmark = pytest.mark.slow

MAX_LEN = 512
VOCAB = 4096                                # the shipped tiny model's (config.json)
N_GOOD = 64
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--enforce-eager", "--seed", "0",
              "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']
# The smallest pool vLLM accepts for one MAX_LEN request of the shipped model (its start-up check: 45 blocks
# with the compact cache layout of vllm_plugin/kv_layout.py); running requests then outgrow it while decoding.
SMALL_POOL = ["--num-gpu-blocks-override", "45"]


def good_requests() -> list[dict[str, Any]]:
    """Greedy completions of token-id prompts; every 8th prompt is 230..250 tokens long and decodes past 256."""
    rng = random.Random(13)
    out = []
    for i in range(N_GOOD):
        n = rng.randint(230, 250) if i % 8 == 0 else rng.randint(2, 60)
        out.append({"prompt": [rng.randrange(3, VOCAB) for _ in range(n)],
                    "max_tokens": rng.randint(24, 40) if i % 8 == 0 else rng.randint(8, 32)})
    return out


def bad_requests(model: str) -> list[tuple[str, bytes]]:
    """(what, request body): each must be answered with a 4xx and a message."""
    ok = {"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0}
    cases: list[tuple[str, Any]] = [
        ("prompt longer than the context", {**ok, "prompt": list(range(3, 3 + MAX_LEN + 40))}),
        ("negative max_tokens", {**ok, "max_tokens": -1}),
        ("temperature -1", {**ok, "temperature": -1.0}),
        ("top_p 2", {**ok, "top_p": 2.0}),
        ("unknown model", {**ok, "model": "no-such-model"}),
        ("out-of-vocabulary token id", {**ok, "prompt": [5, VOCAB + 7, 6]}),
        ("negative token id", {**ok, "prompt": [5, -3, 6]}),
    ]
    return [(what, json.dumps(body).encode()) for what, body in cases] + [
        ("invalid JSON", b'{"model": "' + model.encode() + b'", "prompt": [5, 6'),
        ("prompt of the wrong type", json.dumps({**ok, "prompt": {"ids": [5]}}).encode())]


def post(server: Server, body: bytes, timeout: float = 600) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def complete(server: Server, model: str, req: dict[str, Any]) -> list[int]:
    body = {"model": model, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, **req}
    status, out = post(server, json.dumps(body).encode())
    assert status == 200, (status, out)
    return list(out["choices"][0]["token_ids"])


def drop_stream(server: Server, model: str, prompt: list[int]) -> int:
    """Stream a long completion, read two chunks, then close the socket; returns the chunks seen."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 200, "temperature": 0.0,
                       "ignore_eos": True, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    seen = 0
    while seen < 2:
        line = resp.fp.readline()
        assert line, "stream ended before the client dropped it"
        seen += line.startswith(b"data:")
    conn.sock.close()                       # the client goes away mid-stream
    conn.close()
    return seen


def message_of(out: Any) -> str:
    if isinstance(out, dict):
        err = out.get("error", out.get("detail", out.get("message", "")))
        return str(err.get("message", "") if isinstance(err, dict) else err)
    return str(out)


def metrics(server: Server) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (name, _), value in parse_prometheus(server_text(server, "/metrics")).items():
        totals[name] = totals.get(name, 0.0) + value
    return totals


def server_text(server: Server, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200, (path, resp.status)
        return resp.read().decode()
    finally:
        conn.close()


def idle(server: Server, timeout_s: float = 60.0) -> dict[str, float]:
    """Wait until nothing runs or waits (aborted streams are freed asynchronously); the last metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def under_load(server: Server, model: str, goods: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything at once, in a shuffled order: good, bad and dropped streaming requests."""
    bads = bad_requests(model)
    jobs: list[tuple[str, int, Any]] = [("good", i, g) for i, g in enumerate(goods)]
    jobs += [("bad", i, b) for i, b in enumerate(bads)]
    jobs += [("drop", i, goods[i * 7 + 1]["prompt"]) for i in range(4)]
    random.Random(7).shuffle(jobs)

    def run(job: tuple[str, int, Any]) -> tuple[str, int, Any]:
        kind, i, arg = job
        if kind == "good":
            return kind, i, complete(server, model, arg)
        if kind == "bad":
            return kind, i, post(server, arg[1], timeout=120)
        return kind, i, drop_stream(server, model, arg)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    got = {i: r for kind, i, r in results if kind == "good"}
    return {"good": [got[i] for i in range(len(goods))],
            "bad": {bads[i][0]: r for kind, i, r in results if kind == "bad"},
            "dropped": [r for kind, _, r in results if kind == "drop"]}


def check_load(server: Server, model: str, goods: list[dict[str, Any]], want: list[list[int]]) -> dict[str, float]:
    res = under_load(server, model, goods)
    wrong = [i for i, (g, w) in enumerate(zip(res["good"], want)) if g != w]
    assert not wrong, f"{len(wrong)} good requests differ from their sequential output under load: {wrong}"
    for what, (status, out) in res["bad"].items():
        assert 400 <= status < 500, (what, status, out)
        assert message_of(out).strip(), (what, status, out)
    assert res["dropped"] == [2] * 4
    assert server_text(server, "/health") == ""
    after = idle(server)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0.0, "KV blocks still allocated after every request ended"
    for i in range(0, N_GOOD, 9):                                      # and it still answers the same
        assert complete(server, model, goods[i]) == want[i], i
    return after


def server(tmp_path, name: str, extra: list[str]) -> Server:
    return Server(model=str(tiny_model_path()), log_path=str(tmp_path / f"{name}.log"), start_timeout_s=600,
                  extra_args=SERVE_ARGS + extra, env={**SMALL_CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})


def test_serve_with_mtp_under_concurrent_good_bad_and_dropped_requests(tmp_path):
    goods = good_requests()
    with server(tmp_path, "default_pool", []) as srv:
        model = srv.served_model()
        want = [complete(srv, model, g) for g in goods]                 # sequential, before any load
        assert all(len(w) == g["max_tokens"] for w, g in zip(want, goods))
        m = check_load(srv, model, goods, want)
        assert m["vllm:spec_decode_num_drafts_total"] > 0 and m["vllm:spec_decode_num_accepted_tokens_total"] > 0

    with server(tmp_path, "small_pool", SMALL_POOL) as srv:
        model = srv.served_model()
        m = check_load(srv, model, goods, want)
        assert m["vllm:num_preemptions_total"] > 0, "the small KV pool never preempted a request"


def test_out_of_vocabulary_ids_without_a_tokenizer_fail_the_request_not_the_engine():
    """vLLM checks prompt ids against the vocabulary only when a tokenizer is loaded; without one an id >= vocab
    reached our embedding and its IndexError killed the engine (``vllm_plugin/token_ids.py``)."""
    from vllm.exceptions import VLLMValidationError

    import vllm_support as vs

    with vs.one_torch_thread():
        with vs.engine(tiny_model_path(), 1, skip_tokenizer_init=True) as llm:
            want = vs.generate(llm, [[5, 6, 7]], 4)
            for bad in ([5, VOCAB + 904, 6], [5, -1, 6]):
                with pytest.raises(VLLMValidationError, match=f"Token id {bad[1]} is out of vocabulary"):
                    vs.generate(llm, [bad], 4)
            assert vs.generate(llm, [[5, 6, 7]], 4) == want            # the engine still serves
