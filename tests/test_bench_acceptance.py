"""dsv4 bench-acceptance: metrics parsing, acceptance formulas, health verdicts, and the server-driving loop
against a stand-in server (the real vLLM runs are in the vLLM end-to-end tests and benchmarks/acceptance.py)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from vllm_deepseek_v4.cli import bench_acceptance as ba
from vllm_deepseek_v4.cli.main import main
from vllm_deepseek_v4.cli.serve_client import Server, SpecCounters, parse_prometheus

FAKE = os.path.join(os.path.dirname(__file__), "fake_vllm_server.py")

METRICS = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 40.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 80.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 50.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 32.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 18.0
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_parse_prometheus_and_formulas():
    samples = parse_prometheus(METRICS)
    assert samples[("vllm:spec_decode_num_drafts_total", (("engine", "0"), ("model_name", "m")))] == 40.0
    c = SpecCounters.from_metrics(samples)
    assert (c.drafts, c.draft_tokens, c.accepted, c.accepted_per_pos) == (40, 80, 50, (32, 18))
    s = (c - SpecCounters(drafts=20, draft_tokens=40, accepted=20, accepted_per_pos=(15, 5))).summary()
    # accepted/draft_tokens, per_pos/drafts, 1 + accepted/drafts (vLLM's own definitions)
    assert s["acceptance_rate"] == pytest.approx(30 / 40)
    assert s["per_position"] == pytest.approx([17 / 20, 13 / 20])
    assert s["mean_acceptance_length"] == pytest.approx(1 + 30 / 20)


def test_no_drafts_gives_none_not_zero():
    s = SpecCounters().summary()
    assert s["acceptance_rate"] is None and s["mean_acceptance_length"] is None


def _report(rate, match=True):
    spec = {"acceptance_rate": rate, "per_position": [rate or 0.0], "mean_acceptance_length": 1 + (rate or 0)}
    return {"configs": [{"k": None, "by_temperature": {"0.0": {"spec": None}}},
                        {"k": 1, "greedy_matches_baseline": match, "by_temperature": {"0.0": {"spec": spec}}}]}


@pytest.mark.parametrize("rate,match,healthy", [(0.62, True, True), (0.01, True, False), (None, True, False),
                                                 (0.62, False, False)])
def test_health_verdicts(rate, match, healthy):
    h = ba.health(_report(rate, match))
    assert h["healthy"] is healthy
    assert bool(h["likely_causes"]) is (not healthy)
    if rate == 0.01:
        assert "near 0" in h["problems"][0]


def test_shipped_prompt_set():
    prompts = ba.load_prompts(None)
    assert len(prompts) >= 8 and all(len(p) > 100 for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_prompts_file_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected .*prompt"):
        ba.load_prompts(bad)


def test_server_stopped_by_pid(tmp_path):
    srv = Server("m", cmd=[sys.executable, FAKE, "{port}", "{model}"], log_path=str(tmp_path / "log"),
                 start_timeout_s=60)
    with srv:
        assert srv.served_model() == "m"
        pid = srv.proc.pid
    assert srv.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_server_that_dies_reports_its_log(tmp_path):
    srv = Server("m", cmd=[sys.executable, "-c", "import sys; print('boom: no such model'); sys.exit(3)"],
                 log_path=str(tmp_path / "log"), start_timeout_s=60)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*boom: no such model"):
        srv.start()


def _run_cli(tmp_path, monkeypatch, accept, extra=()):
    out = tmp_path / "report.json"
    monkeypatch.setenv("FAKE_ACCEPT", accept)
    rc = main(["bench-acceptance", "fake-model", "--skip-verify", "--k", "1,2", "--num-prompts", "3",
               "--max-tokens", "20", "--server-cmd", f"{sys.executable} {FAKE} {{port}} {{model}}",
               "--log-dir", str(tmp_path), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_bench_healthy_draft(tmp_path, monkeypatch, capsys):
    rc, report = _run_cli(tmp_path, monkeypatch, "0.7,0.4")
    assert rc == 0, capsys.readouterr()
    assert [c["k"] for c in report["configs"]] == [None, 1, 2]
    k1 = report["configs"][1]["by_temperature"]["0.0"]
    k2 = report["configs"][2]["by_temperature"]["0.0"]
    # the stand-in accepts position i at a long-run rate p_i (low-discrepancy sequence, ~35 drafts here)
    assert k1["spec"]["per_position"][0] == pytest.approx(0.7, abs=0.08)
    assert k2["spec"]["per_position"] == pytest.approx([0.7, 0.4], abs=0.08)
    assert k1["spec"]["mean_acceptance_length"] == pytest.approx(1 + k1["spec"]["accepted"] / k1["spec"]["drafts"])
    assert report["configs"][1]["greedy_matches_baseline"] is True
    assert "speedup" in k1 and report["health"]["healthy"]
    assert "health: OK" in capsys.readouterr().out


def test_bench_flags_zero_acceptance_as_broken(tmp_path, monkeypatch, capsys):
    rc, report = _run_cli(tmp_path, monkeypatch, "0.0,0.0", ["--temperatures", "0"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "health: BROKEN" in out and "near 0" in out and "head/embed" in out
    assert report["health"]["likely_causes"] and "likely causes (docs/prior-art.md §1):" in out


def test_every_listed_cause_is_described_in_the_repo_docs():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "prior-art.md").read_text()
    for cause in ba.LIKELY_CAUSES:
        labels = re.match(r"^(F\d)(?:/(F\d))?: ", cause)
        assert labels, cause
        for label in filter(None, labels.groups()):
            assert f"### {label}. " in doc, label


def test_bench_args_takes_the_commands_defaults_and_refuses_unknown_options():
    args = ba.bench_args("some/artifact", k="2", per_prompt=True)
    assert (args.path, args.k, args.per_prompt) == ("some/artifact", "2", True)
    assert args.temperatures == "0,0.8" and args.request_timeout == 300.0 and args.prompts_from_corpus is None
    with pytest.raises(TypeError, match="unknown option 'num_prompt'"):
        ba.bench_args("some/artifact", num_prompt=4)


def test_server_plan_one_server_per_k_and_drafting_method():
    assert ba.server_plan([1, 2], "probabilistic", [0.0, 0.8], True) == [
        (None, None, [0.0, 0.8]), (1, "probabilistic", [0.0, 0.8]), (2, "probabilistic", [0.0, 0.8])]
    # both: the greedy server covers T = 0 (where vLLM drafts greedily anyway), the probabilistic one T > 0 only
    assert ba.server_plan([1], "both", [0.0, 0.8], False) == [(1, "greedy", [0.0, 0.8]), (1, "probabilistic", [0.8])]
    assert ba.server_plan([1], "both", [0.0], False) == [(1, "greedy", [0.0])]
    assert [ba.row_drafting(m, t) for m, t in [("probabilistic", 0.0), ("probabilistic", 0.8), (None, 0.8)]] == [
        "greedy", "probabilistic", None]
    assert ba.bench_args("x").draft_sample_method == "probabilistic"


def test_bench_reports_the_drafting_method_of_every_row(tmp_path, monkeypatch, capsys):
    rc, report = _run_cli(tmp_path, monkeypatch, "0.7,0.4", ["--k", "1", "--draft-sample-method", "both"])
    assert rc == 0, capsys.readouterr()
    assert report["draft_sample_method"] == "both"
    assert [(c["k"], c["draft_sample_method"], list(c["by_temperature"])) for c in report["configs"]] == [
        (None, None, ["0.0", "0.8"]), (1, "greedy", ["0.0", "0.8"]), (1, "probabilistic", ["0.8"])]
    assert report["configs"][2]["by_temperature"]["0.8"]["draft_sample_method"] == "probabilistic"
    assert report["configs"][1]["by_temperature"]["0.0"]["draft_sample_method"] == "greedy"
    assert {p.name for p in tmp_path.glob("serve_*.log")} == {
        "serve_baseline.log", "serve_k1_greedy.log", "serve_k1_probabilistic.log"}
    table = capsys.readouterr().out
    assert "| 1 | probabilistic | 0.8 |" in table and "| 1 | greedy | 0.8 |" in table and "| none | - | 0.0 |" in table
    assert main(["bench-acceptance", "x", "--draft-sample-method", "sampled"]) == 2     # argparse's usage error
