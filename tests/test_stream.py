"""Streaming through the plan: every layout of the same weights yields bit-identical canonical tensors."""
from __future__ import annotations

import pytest
import torch
from artifacts import NATIVE, canonical_tensors, make_checkpoint, make_config, to_convention, write_artifact

from vllm_deepseek_v4.errors import AliasMismatchError, PlanError
from vllm_deepseek_v4.loader import build_plan
from vllm_deepseek_v4.loader.stream import iter_plan_tensors, plan_keys


def stream(path, **kw) -> dict[str, torch.Tensor]:
    plan = build_plan(str(path), **kw)
    return dict(iter_plan_tensors(plan, progress=False))


def test_upstream_layout_streams_exactly_what_was_written(tmp_path):
    cfg = make_config()
    ref = canonical_tensors(cfg)
    got = stream(write_artifact(tmp_path, ref, cfg))
    assert set(got) == set(ref)
    for k, t in ref.items():
        assert torch.equal(got[k], t), k


@pytest.mark.parametrize("convention", ["hf", "hf_saved", "vllm", "nemo"])
def test_every_convention_streams_bit_identical_tensors(tmp_path, convention):
    base = stream(make_checkpoint(tmp_path / "up"))
    other = stream(make_checkpoint(tmp_path / convention, convention=convention))
    assert set(other) == set(base)
    for k in base:
        assert other[k].dtype == base[k].dtype and torch.equal(other[k], base[k]), k


def test_quantized_roles_stream_under_canonical_role_names(tmp_path):
    got = stream(make_checkpoint(tmp_path, schemes=NATIVE, flavor="hf"))
    assert got["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu      # on disk: .weight_scale_inv
    assert got["mtp.0.ffn.experts.1.w2.weight"].dtype == torch.int8 and "mtp.0.ffn.experts.1.w2.scale" in got


def test_shared_alias_copies_are_compared_and_yielded_once(tmp_path):
    def dup(t):
        t["mtp.0.head.weight"] = t["head.weight"].float()
    plan = build_plan(str(make_checkpoint(tmp_path, edit=dup)))
    keys = plan_keys(plan)
    assert keys.count("head.weight") == 1
    assert len(dict(iter_plan_tensors(plan, progress=False))) == len(keys)


def test_disagreeing_alias_names_the_copy(tmp_path):
    def dup(t):
        t["mtp.0.head.weight"] = t["head.weight"].float() + 1
    plan = build_plan(str(make_checkpoint(tmp_path, edit=dup)))
    with pytest.raises(AliasMismatchError, match=r"mtp\.0\.head\.weight: expected the values of head\.weight"):
        dict(iter_plan_tensors(plan, progress=False))


def test_a_bad_plan_streams_nothing(tmp_path):
    plan = build_plan(str(make_checkpoint(tmp_path, edit=lambda t: t.pop("norm.weight"))))
    with pytest.raises(PlanError, match="norm.weight: missing"):
        next(iter_plan_tensors(plan, progress=False))
