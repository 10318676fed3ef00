"""Loading the portable model through the plan: every layout of one model computes identical logits."""
from __future__ import annotations

import pytest
import torch
from vllm_deepseek_v4.devtools.artifacts import make_checkpoint, make_config

from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.model.init import init_random_  # noqa: F401  (the model package is importable)

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 12, 5, 64, 33, 8, 200, 150, 9, 77, 31, 2, 18, 44]])


def logits_of(path):
    model, plan = load_model(str(path), dtype=torch.float32, progress=False)
    with torch.no_grad():
        main, hidden = model(IDS)
        draft, _ = model.forward_mtp(hidden[:, :-1], IDS[:, 1:], model.new_mtp_state(), k=0)
    return main, draft, plan


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return logits_of(make_checkpoint(tmp_path_factory.mktemp("upstream")))


@pytest.mark.parametrize("convention", ["hf", "hf_saved", "vllm", "nemo"])
def test_naming_layouts_give_bit_identical_main_and_mtp_logits(tmp_path, reference, convention):
    main, draft, _ = logits_of(make_checkpoint(tmp_path, convention=convention))
    assert torch.equal(main, reference[0]) and torch.equal(draft, reference[1])


def test_duplicated_head_embed_aliases_give_identical_logits(tmp_path, reference):
    def dup(t):
        t["mtp.0.head.weight"] = t["head.weight"].float()
        t["mtp.0.emb.tok_emb.weight"] = t["embed.weight"].clone()
    main, draft, plan = logits_of(make_checkpoint(tmp_path, edit=dup))
    assert plan.mtp_report()["aliases"] and torch.equal(main, reference[0]) and torch.equal(draft, reference[1])


def test_draft_head_is_the_shared_head_object(tmp_path):
    model, _ = load_model(str(make_checkpoint(tmp_path)), dtype=torch.float32, progress=False)
    sd = model.state_dict()
    assert "head.weight" in sd and not any(k.startswith("mtp.") and k.endswith(("head.weight", "embed.weight")) for k in sd)
    assert not any(p.is_meta for p in model.parameters())


def test_quantized_mtp_gets_its_own_schemes(tmp_path):
    schemes = {"main": {"experts": "nvfp4", "attn": "fp8_block"}, "mtp.0": {"experts": "mxfp4"}}
    model, plan = load_model(str(make_checkpoint(tmp_path, schemes=schemes)), dtype=torch.float32, progress=False)
    mods = dict(model.named_modules())
    assert mods["layers.1.ffn.experts.0.w1"].scheme == "nvfp4" and mods["layers.1.attn.wq_a"].scheme == "fp8_block"
    assert mods["mtp.0.ffn.experts.0.w1"].scheme == "mxfp4" and mods["mtp.0.attn.wq_a"].scheme == "bf16"
    with torch.no_grad():
        logits, _ = model(IDS)
    assert torch.isfinite(logits).all()
