"""``dsv4 compare A B``: naming-only variants are exactly equal, quantized ones slightly apart, errors are clear."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_deepseek_v4.devtools.artifacts import NATIVE, make_checkpoint, make_config

from vllm_deepseek_v4.cli.compare_cmd import default_ids
from vllm_deepseek_v4.cli.main import main
from vllm_deepseek_v4.config import DSV4Config

IDS = "3,17,42,7,99,1,250,12,5,64,33,8,200,150,9,77,31,2,18,44"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {
        "upstream": make_checkpoint(root / "upstream"),
        "hf": make_checkpoint(root / "hf", convention="hf"),
        "vllm": make_checkpoint(root / "vllm", convention="vllm"),
        "native": make_checkpoint(root / "native", schemes=NATIVE),
    }


def compare_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["compare", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("other", ["hf", "vllm"])
def test_naming_only_variants_are_exactly_equal(artifacts, capsys, other):
    rep = compare_json(capsys, str(artifacts["upstream"]), str(artifacts[other]))
    cfg = DSV4Config.from_dict(make_config())
    assert rep["positions"] == len(default_ids(cfg)) == 2 * 128 + 8
    assert rep["naming"] == ["upstream", other] and rep["config_differences"] == []
    for head in ("main", "mtp"):
        assert rep[head]["max_abs_diff"] == 0.0 and rep[head]["mean_abs_diff"] == 0.0
        assert rep[head]["top1_agreement"] == 1.0
    assert rep["mtp"]["positions"] == rep["positions"] - 1


def test_hf_vs_vllm_names_with_given_ids(artifacts, capsys):
    rep = compare_json(capsys, str(artifacts["hf"]), str(artifacts["vllm"]), "--ids", IDS)
    assert rep["positions"] == 20 and rep["main"]["max_abs_diff"] == 0.0 and rep["mtp"]["max_abs_diff"] == 0.0


def test_bf16_vs_fp8_mxfp4_is_small_but_nonzero(artifacts, capsys):
    rep = compare_json(capsys, str(artifacts["upstream"]), str(artifacts["native"]), "--ids", IDS)
    for head in ("main", "mtp"):
        r = rep[head]
        assert 0 < r["mean_abs_diff"] <= r["max_abs_diff"] and 0 < r["max_rel_diff"] < 1
        assert 0.5 <= r["top1_agreement"] <= 1
    assert rep["quant"][0]["main"]["experts"] == "bf16" and rep["quant"][1]["main"]["experts"] == "mxfp4"


def test_human_table(artifacts, capsys):
    assert main(["compare", str(artifacts["upstream"]), str(artifacts["native"]), "--ids", IDS]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "20 token positions, fp32 compute"
    assert out[4].split() == ["logits", "positions", "max_abs_diff", "mean_abs_diff", "max_rel", "top1_agree"]
    assert out[5].split()[:2] == ["main", "20"] and out[6].split()[:2] == ["mtp", "19"]
    assert any(line.startswith("quant B: main: attn=fp8_block") for line in out)


def test_no_mtp_compares_the_main_model_only(tmp_path, artifacts, capsys):
    no_mtp = make_checkpoint(tmp_path, include_mtp=False)
    rep = compare_json(capsys, str(artifacts["upstream"]), str(no_mtp), "--ids", IDS, "--no-mtp")
    assert rep["main"]["max_abs_diff"] == 0.0 and "mtp" not in rep


def test_artifact_without_mtp_fails_to_load_with_the_reason(tmp_path, artifacts, capsys):
    no_mtp = make_checkpoint(tmp_path, include_mtp=False)
    assert main(["compare", str(artifacts["upstream"]), str(no_mtp), "--ids", IDS]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv4 compare: error: ") and "mtp.*: missing: the artifact has no mtp.* tensors" in err


def test_config_differences_are_noted(tmp_path, artifacts, capsys):
    other = make_checkpoint(tmp_path, make_config(routed_scaling_factor=2.0))
    rep = compare_json(capsys, str(artifacts["upstream"]), str(other), "--ids", IDS)
    assert rep["config_differences"] == ["route_scale: 1.5 vs 2.0"] and rep["main"]["max_abs_diff"] > 0
    assert main(["compare", str(artifacts["upstream"]), str(other), "--ids", IDS]) == 0
    assert "note: configs differ: route_scale: 1.5 vs 2.0" in capsys.readouterr().out


def test_vocab_mismatch_is_refused(tmp_path, artifacts, capsys):
    other = make_checkpoint(tmp_path, make_config(vocab_size=384))
    assert main(["compare", str(artifacts["upstream"]), str(other)]) == 1
    err = capsys.readouterr().err
    assert "expected the same vocab_size, found 256 vs 384" in err and "cannot be compared" in err


def test_ids_outside_the_vocab_are_a_usage_error(artifacts, capsys):
    assert main(["compare", str(artifacts["upstream"]), str(artifacts["hf"]), "--ids", "1,2,256,-1"]) == 2
    assert capsys.readouterr().err.strip() == ("dsv4 compare: error: --ids: expected token ids in [0, 256) "
                                               f"(vocab_size of {artifacts['upstream']}), found [256, -1]")


@pytest.mark.parametrize("ids, why", [("1", "at least 2 token ids"), ("1,x,3", "comma-separated integers")])
def test_malformed_ids_are_a_usage_error(artifacts, capsys, ids, why):
    assert main(["compare", str(artifacts["upstream"]), str(artifacts["hf"]), "--ids", ids]) == 2
    assert why in capsys.readouterr().err


def test_missing_artifact(artifacts, tmp_path, capsys):
    assert main(["compare", str(artifacts["upstream"]), str(tmp_path / "nope")]) == 3
    assert capsys.readouterr().err.strip() == f"dsv4 compare: no such artifact: {tmp_path / 'nope'}"


def test_broken_artifact_reports_the_load_error(tmp_path, artifacts, capsys):
    def corrupt(t):
        del t["layers.1.attn.wq_b.weight"]
    broken = make_checkpoint(tmp_path, edit=corrupt)
    assert main(["compare", str(broken), str(artifacts["upstream"])]) == 1
    assert "layers.1.attn.wq_b" in capsys.readouterr().err
