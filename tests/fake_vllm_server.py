"""A stand-in for `vllm serve` used by the bench-acceptance tests: the same endpoints, deterministic answers.

Usage: fake_vllm_server.py PORT MODEL [--speculative-config JSON] [other args ignored]
Env FAKE_ACCEPT: per-position acceptance probabilities, comma-separated (default "0.7,0.4,0.2").
Each completion generates `max_tokens` tokens; with a spec config, one draft of K tokens is proposed per step
and position i is accepted deterministically at a long-run rate p_i (see step()).
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, model = int(sys.argv[1]), sys.argv[2]
k = 0
if "--speculative-config" in sys.argv:
    k = json.loads(sys.argv[sys.argv.index("--speculative-config") + 1])["num_speculative_tokens"]
import os
probs = [float(x) for x in os.environ.get("FAKE_ACCEPT", "0.7,0.4,0.2").split(",")]
state = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * k}


def step():
    """One decode step: returns tokens produced (1 + accepted prefix). Position i is accepted, given i-1 was,
    when a low-discrepancy (Weyl) sequence falls under p_i / p_{i-1}, so the per-position rates approach p_i."""
    state["drafts"] += 1
    state["draft_tokens"] += k
    n, got, prev = state["drafts"], 0, 1.0
    for i in range(k):
        u = (n * (0.6180339887 + 0.1 * i)) % 1.0
        if prev > 0 and u < probs[i] / prev:
            got += 1
            state["per_pos"][i] += 1
            prev = probs[i]
        else:
            break
    state["accepted"] += got
    return 1 + got


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._send("")
        if self.path == "/v1/models":
            return self._send({"data": [{"id": model}]})
        if self.path == "/metrics":
            lab = f'engine="0",model_name="{model}"'
            lines = ["# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
                     "# TYPE vllm:spec_decode_num_drafts_total counter"]
            if k:
                lines += [f"vllm:spec_decode_num_drafts_total{{{lab}}} {float(state['drafts'])}",
                          f"vllm:spec_decode_num_draft_tokens_total{{{lab}}} {float(state['draft_tokens'])}",
                          f"vllm:spec_decode_num_accepted_tokens_total{{{lab}}} {float(state['accepted'])}"]
                lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{lab},position="{i}"}} {float(v)}'
                          for i, v in enumerate(state["per_pos"])]
            return self._send("\n".join(lines) + "\n", "text/plain")
        self.send_error(404)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = req["max_tokens"]
        produced = 0
        while produced < n:
            produced += step() if k else 1
        text = "".join(chr(97 + (len(req["prompt"]) + i) % 26) for i in range(n))
        self._send({"choices": [{"text": text}], "usage": {"completion_tokens": n}})


ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
