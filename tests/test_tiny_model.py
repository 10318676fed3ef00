"""The embedded tiny model (``vllm_deepseek_v4.assets``): a valid upstream artifact with a useful MTP head.

It loads through our plan exactly as a plain state-dict load would, passes ``dsv4 verify``, its tokenizer
round-trips held-out text, and on a fixed held-out slice the draft agrees with the main model far above
chance (and far above the same draft with its own weights re-randomised).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_deepseek_v4.assets import tiny_model_path
from vllm_deepseek_v4.cli.main import main as dsv4_main
from vllm_deepseek_v4.config import load_config
from vllm_deepseek_v4.devtools.corpus import heldout_windows, load_split
from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.model import DSV4Model, init_random_
from vllm_deepseek_v4.model.mtp_eval import mtp_scores

pytest.importorskip("tokenizers")

PATH = tiny_model_path()
WINDOWS, SEQ = 4, 256          # a fixed held-out slice: the first 4 x 256 tokens of the held-out stream
# Thresholds sit well under the trained model's scores (benchmarks/results/train_tiny.md) and far above
# what an untrained draft reaches (~0), so they catch a broken head, embedding, stream input or export.
MIN_AGREEMENT = 0.40
MAX_HELDOUT_MAIN_LOSS = 4.5


@pytest.fixture(scope="module")
def loaded():
    model, plan = load_model(PATH, dtype=torch.float32, progress=False)
    return model.eval(), plan


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return heldout_windows(PATH, WINDOWS, SEQ)


def test_verify_passes(capsys):
    assert dsv4_main(["verify", PATH]) == 0


def test_config_is_the_vllm_dialect_with_every_layer_type():
    raw = json.loads((Path(PATH) / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v4" and raw["architectures"] == ["DeepseekV4ForCausalLM"]
    assert raw["topk_method"] == "noaux_tc" and raw["torch_dtype"] == "bfloat16"
    cfg = load_config(PATH)
    assert cfg.n_mtp_layers == 1 and len(raw["compress_ratios"]) == cfg.n_layers + 1
    assert {0, 4, 128} <= set(cfg.compress_ratios[:cfg.n_layers]) and cfg.compress_ratios[-1] == 0
    assert cfg.n_hash_layers >= 1 and cfg.n_shared_experts >= 1
    assert cfg.head_dim in (32, 64, 80, 96, 112, 128, 256, 512)        # vLLM CPU attention head sizes


def test_plan_load_equals_a_plain_state_dict_load(loaded, heldout):
    model, plan = loaded
    report = plan.mtp_report()
    assert report["complete"] and report["layers"] == 1 and not report["aliases"]
    assert set(plan.quant_report()) == {"main", "mtp.0"}
    assert all(s == "bf16" for groups in plan.quant_report().values() for s in groups.values())
    direct = DSV4Model(model.cfg, dtype=torch.float32)
    direct.load_state_dict(load_file(str(Path(PATH) / "model.safetensors")), strict=True)
    ids = heldout[:1, :160]                 # past one HCA window (128)
    with torch.no_grad():
        a_main, a_hidden = model(ids)
        b_main, b_hidden = direct.eval()(ids)
        a_draft, _ = model.forward_mtp(a_hidden[:, :-1], ids[:, 1:])
        b_draft, _ = direct.forward_mtp(b_hidden[:, :-1], ids[:, 1:])
    assert torch.equal(a_main, b_main) and torch.equal(a_draft, b_draft)


def test_tokenizer_round_trips_and_matches_the_config():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    raw = json.loads((Path(PATH) / "config.json").read_text())
    assert (tok.bos_token_id, tok.eos_token_id) == (raw["bos_token_id"], raw["eos_token_id"])
    assert len(tok) == raw["vocab_size"]
    text = load_split("heldout")[0]["text"][:2000] + "\n\tünïcode ✓ 日本\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and max(ids) < raw["vocab_size"]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_heldout_mtp_agreement_is_far_above_chance(loaded, heldout):
    model, _ = loaded
    s = mtp_scores(model, heldout, batch=WINDOWS)
    assert s.main_loss < MAX_HELDOUT_MAIN_LOSS, s
    assert s.agreement >= MIN_AGREEMENT, s
    assert s.draft_accuracy > 0.15, s


def test_a_random_draft_scores_about_zero(loaded, heldout):
    """The same trunk with the MTP block re-randomised: agreement collapses, so the test above measures
    the trained draft rather than something the trunk alone provides."""
    model, _ = loaded
    scratch = init_random_(DSV4Model(model.cfg, dtype=torch.float32), seed=123)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    sd.update({k: v for k, v in scratch.state_dict().items() if k.startswith("mtp.")})
    scratch.load_state_dict(sd)
    s = mtp_scores(scratch.eval(), heldout, batch=WINDOWS)
    assert s.agreement < 0.1, s
