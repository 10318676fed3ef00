"""Streaming through the plan: every layout of the same weights yields bit-identical canonical tensors."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch
from vllm_deepseek_v4.devtools.artifacts import NATIVE, canonical_tensors, make_checkpoint, make_config, to_convention, write_artifact

from vllm_deepseek_v4.errors import AliasMismatchError, CheckpointError, PlanError
from vllm_deepseek_v4.loader import build_plan
from vllm_deepseek_v4.loader.stream import PositionalReader, apply_ops, iter_plan_tensors, plan_keys


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


def test_streamed_tensors_own_exactly_their_bytes(tmp_path):
    """Not views of the file's memory map, not views of a bigger fused source (vLLM stacks, fused projections)."""
    plan = build_plan(str(make_checkpoint(tmp_path, convention="vllm")))
    for key, t in iter_plan_tensors(plan, progress=False):
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size(), key


def test_leading_slices_read_only_their_range_and_match_the_full_read(tmp_path):
    plan = build_plan(str(make_checkpoint(tmp_path, convention="vllm")))
    src = plan.params["layers.1.ffn.experts.2.w3"].roles["weight"]       # select(0, 2) + narrow(0, I, I) of w13
    assert [op[0] for op in src.ops] == ["select", "narrow"]
    with PositionalReader(plan.checkpoint) as reader:
        piece, rest = reader.read(plan.checkpoint.tensors[src.tensor], src.ops)
        whole, _ = reader.read(plan.checkpoint.tensors[src.tensor])
    assert rest == () and torch.equal(piece, apply_ops(whole, src.ops))


def test_a_shard_changed_after_planning_is_refused(tmp_path):
    path = make_checkpoint(tmp_path)
    plan = build_plan(str(path))
    shard = sorted(path.glob("*.safetensors"))[-1]
    with open(shard, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: ") + r".*file changed since it was scanned"):
        dict(iter_plan_tensors(plan, progress=False))


def test_a_truncated_shard_names_file_and_tensor(tmp_path):
    path = make_checkpoint(tmp_path)
    plan = build_plan(str(path))
    shard = sorted(path.glob("*.safetensors"))[-1]
    last = max((t for t in plan.checkpoint.tensors.values() if t.file == shard.name), key=lambda t: t.end)
    os.truncate(shard, os.path.getsize(shard) - 4)
    reader = PositionalReader(plan.checkpoint)
    reader.ckpt = dataclasses.replace(plan.checkpoint, files={**plan.checkpoint.files, shard.name: os.path.getsize(shard)})
    with reader, pytest.raises(CheckpointError, match=re.escape(f"{shard}: {last.name}: file ended inside")):
        reader.read(last)
