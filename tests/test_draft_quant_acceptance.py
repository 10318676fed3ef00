"""Held-out corpus prompts for ``dsv4 bench-acceptance`` and the draft-quantization benchmark's pair checks
(benchmarks/draft_quant_acceptance.py), against the stand-in server (no vLLM here)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vllm_deepseek_v4.cli import bench_acceptance as ba
from vllm_deepseek_v4.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "tiny_corpus" / "heldout.jsonl"
FAKE = os.path.join(os.path.dirname(__file__), "fake_vllm_server.py")


def _benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module: the benchmarks are scripts (no package) that import only ours."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dq = _benchmark("draft_quant_acceptance")


def test_corpus_prompts_are_distinct_line_aligned_and_extend_the_shipped_set():
    prompts = ba.corpus_prompts(HELDOUT, 48)
    assert len(prompts) == 48 and len(set(prompts)) == 48
    assert prompts == ba.corpus_prompts(HELDOUT, 48)                    # deterministic
    docs = [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()]
    for p in prompts:
        assert p.endswith("\n") and 0 < len(p) <= 320
        assert any(d.startswith(p) or f"\n{p}" in d for d in docs)        # starts at a line start of a document
    assert prompts[:16] == ba.load_prompts(None)                        # the shipped set is its first 16


def test_corpus_prompts_refuse_training_text_bad_rows_and_too_many(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "a line\n" * 200}) + "\n")
    with pytest.raises(ValueError, match="held-out text, not the training split"):
        ba.corpus_prompts(train, 2)
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"held.jsonl:1: expected .*\"text\""):
        ba.corpus_prompts(bad, 2)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "a line\n" * 100}) + "\n")       # 700 chars: one 320-char piece
    with pytest.raises(ValueError, match="hold 1 distinct 320-character prompts, 5 were asked"):
        ba.corpus_prompts(small, 5)
    ns = argparse.Namespace(prompts="x.jsonl", prompts_from_corpus=str(HELDOUT), num_prompts=None, prompt_chars=320)
    with pytest.raises(ValueError, match="exclusive"):
        ba.select_prompts(ns)


def test_cli_refuses_training_prompts_before_serving(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "a line\n" * 200}) + "\n")
    rc = main(["bench-acceptance", "fake-model", "--skip-verify", "--prompts-from-corpus", str(train),
               "--server-cmd", "false-server-never-started"])
    assert rc == 2
    assert "held-out text, not the training split" in capsys.readouterr().err


def test_cli_serves_corpus_prompts_and_records_per_prompt_counters(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.json"
    monkeypatch.setenv("FAKE_ACCEPT", "0.7,0.4")
    rc = main(["bench-acceptance", "fake-model", "--skip-verify", "--k", "2", "--temperatures", "0", "--no-baseline",
               "--prompts-from-corpus", str(HELDOUT), "--num-prompts", "5", "--max-tokens", "20", "--per-prompt",
               "--server-cmd", f"{sys.executable} {FAKE} {{port}} {{model}}", "--log-dir", str(tmp_path),
               "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["prompts"] == 5 and report["prompt_source"] == str(HELDOUT)
    greedy = report["configs"][0]["by_temperature"]["0.0"]
    assert len(greedy["texts"]) == 5 and len(greedy["per_prompt"]) == 5
    for key in ("drafts", "draft_tokens", "accepted"):                   # per-request diffs add up to the total
        assert sum(p[key] for p in greedy["per_prompt"]) == greedy["spec"][key]
    assert all(p["drafts"] > 0 for p in greedy["per_prompt"])


def _study(tmp_path, monkeypatch) -> argparse.Namespace:
    """Serve every study layout through the stand-in (same answers for all: the same target, same draft)."""
    monkeypatch.setenv("FAKE_ACCEPT", "0.6,0.3")
    zoo = tmp_path / "zoo"
    for name in dq.layouts():
        (zoo / name).mkdir(parents=True)
    args = argparse.Namespace(zoo=str(zoo), corpus=str(HELDOUT), prompt_chars=320, num_prompts=4, max_tokens=16,
                              serve_args="", server_cmd=f"{sys.executable} {FAKE} {{port}} {{model}}",
                              raw_dir=str(tmp_path / "raw"))
    dq.serve_all(args, dq.layouts(), [1])
    return args


def test_pairs_on_the_same_text_and_a_changed_text_is_caught(tmp_path, monkeypatch):
    args = _study(tmp_path, monkeypatch)
    rows = dq.build_rows(args, [1], None)
    assert len(rows) == len(dq.PAIRS)
    for r in rows:
        assert r["same_text"] is True and r["delta_pts"] == 0.0 and r["paired_se_pts"] == 0.0
        assert r["binomial_se_pts"] > 0
    # a quantized member whose target changed (different greedy text) must be flagged
    quant = dq.PAIRS[0][2]
    path = dq.raw_path(args.raw_dir, quant, 1)
    report = json.loads(path.read_text())
    dq.greedy(report)["texts"][0] += "x"
    path.write_text(json.dumps(report))
    flagged = {r["quant_layout"]: r["same_text"] for r in dq.build_rows(args, [1], None)}
    assert flagged[quant] is False
    assert all(v for k, v in flagged.items() if k != quant)


def test_noise_estimates():
    assert dq.binomial_se(50, 100) == pytest.approx(0.05)
    rows = [{"accepted": a, "draft_tokens": 10} for a in (2, 4, 6, 8)]
    # equal draft tokens per prompt: the jackknife of a ratio is the classic SE of the mean of per-prompt rates
    rates = [0.2, 0.4, 0.6, 0.8]
    mean = sum(rates) / 4
    classic = math.sqrt(sum((r - mean) ** 2 for r in rates) / 3 / 4)
    assert dq.jackknife_se(rows) == pytest.approx(classic)
    assert dq.jackknife_se(rows, rows) == 0.0                           # a draft against itself: no noise
    shifted = [{"accepted": r["accepted"] + 1, "draft_tokens": 10} for r in rows]
    assert dq.jackknife_se(shifted, rows) == pytest.approx(0.0, abs=1e-12)   # a constant per-prompt gain
    with pytest.raises(ValueError, match="4 vs 3 prompts"):
        dq.jackknife_se(rows, rows[:3])
