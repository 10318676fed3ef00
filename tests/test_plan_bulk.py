"""Bulk planning (whole header / whole name-group passes) gives exactly what tensor-by-tensor planning gives.

``build_plan`` and ``scan_checkpoint`` take C-level passes over all names at once and fall back to the
per-entry, per-name code on anything irregular. Each test here runs both ways and compares everything: the
parameters (in order), every problem line and its order, the explained and unmapped tensors.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from vllm_deepseek_v4.devtools.artifacts import NATIVE, make_checkpoint
from hypothesis import given
from hypothesis import strategies as st

from vllm_deepseek_v4.checkpoint import format as fmt
from vllm_deepseek_v4.checkpoint import scan_checkpoint
from vllm_deepseek_v4.errors import CheckpointError
from vllm_deepseek_v4.loader import build_plan
from vllm_deepseek_v4.loader import plan as plan_mod


def one_by_one(names_resolver, names):
    return [], list(range(len(names)))


def snapshot(plan) -> dict:
    return {"params": list(plan.params.items()), "errors": plan.errors, "missing": plan.missing,
            "unmapped": plan.unmapped, "explained": plan.explained, "warnings": plan.warnings,
            "naming": plan.naming, "json": plan.to_json()}


def both_ways(path, monkeypatch, **kw):
    fast = build_plan(str(path), **kw)
    with monkeypatch.context() as m:
        m.setattr(plan_mod, "resolve_names", one_by_one)
        m.setattr(fmt, "_bulk_entries", lambda *a: None)
        slow = build_plan(str(path), **kw)
    return fast, slow


def _bf16_layer_experts(layer: int):
    """Layer ``layer``'s routed experts stored BF16 in an otherwise MXFP4 artifact (mixed per layer)."""
    def edit(t):
        for n in [n for n in t if n.startswith(f"layers.{layer}.ffn.experts.") and n.endswith(".scale")]:
            del t[n]
            w = n[:-len("scale")] + "weight"
            rows, half = t[w].shape
            t[w] = torch.zeros(rows, half * 2, dtype=torch.bfloat16)
    return edit


def _bad_expert_scale(t):
    t["layers.1.ffn.experts.2.w3.scale"] = t["layers.1.ffn.experts.2.w3.scale"][:, :1].clone()


CASES = {
    "upstream bf16": dict(),
    "hf": dict(convention="hf"),
    "hf_saved": dict(convention="hf_saved"),
    "nemo": dict(convention="nemo"),
    "vllm": dict(convention="vllm"),
    "native fp8 + mxfp4": dict(schemes=NATIVE),
    "hf fp8": dict(schemes={"main": {"attn": "fp8_block"}}, flavor="hf"),
    "nvfp4 trunk": dict(schemes={"main": {"experts": "nvfp4", "attn": "fp8_block"}}),
    "modelopt nvfp4": dict(schemes={"main": {"experts": "nvfp4"}, "mtp.0": {"experts": "mxfp4"}}, flavor="modelopt"),
    "w4a16": dict(schemes={"main": {"experts": "w4a16", "attn": "fp8_block"}}),
    "mixed per layer": dict(schemes=NATIVE, edit=_bf16_layer_experts(1)),
    "bad expert scale": dict(schemes=NATIVE, edit=_bad_expert_scale),
    "missing expert": dict(edit=lambda t: t.pop("layers.2.ffn.experts.1.w2.weight")),
    "missing scale": dict(schemes=NATIVE, edit=lambda t: t.pop("layers.1.ffn.experts.0.w1.scale")),
    "unmapped": dict(edit=lambda t: t.__setitem__("layers.0.attn.mystery.weight", torch.zeros(2))),
    "unknown expert linear": dict(edit=lambda t: t.__setitem__("layers.0.ffn.experts.1.w4.weight", torch.zeros(2))),
    "duplicate spelling": dict(edit=lambda t: t.__setitem__("model.layers.0.self_attn.q_a_norm.weight",
                                                            t["layers.0.attn.q_norm.weight"])),
    "aliases": dict(edit=lambda t: t.update({"mtp.0.head.weight": t["head.weight"].float(),
                                             "mtp.0.emb.tok_emb.weight": t["embed.weight"].clone()})),
    "alias shape conflict": dict(edit=lambda t: t.__setitem__("mtp.0.head.weight", torch.zeros(255, 64))),
    "hash gate bias": dict(edit=lambda t: t.__setitem__("layers.0.ffn.gate.bias", torch.zeros(4))),
    "extra mtp layer": dict(edit=lambda t: t.update({"mtp.1." + n[6:]: t[n].clone() for n in list(t)
                                                     if n.startswith("mtp.0.")})),
    "mtp-only name in a main layer": dict(convention="vllm", edit=lambda t: t.__setitem__(
        "model.layers.1.e_proj.weight", torch.zeros(64, 64))),
    "dsv3-style mtp index": dict(edit=lambda t: t.update({"layers.3." + n[6:]: t.pop(n) for n in list(t)
                                                          if n.startswith("mtp.0.") and ".experts." in n})),
    "VL prefix": dict(edit=lambda t: t.update({"model.language_model.layers.0.self_attn.q_a_proj.weight":
                                               t.pop("layers.0.attn.wq_a.weight")})),
    "non-ascii digit": dict(edit=lambda t: t.__setitem__("layers.\u0663.attn.attn_sink", torch.zeros(4))),
    "no mtp block": dict(include_mtp=False),
}


@pytest.mark.parametrize("label", list(CASES))
def test_bulk_plan_equals_tensor_by_tensor_plan(tmp_path, monkeypatch, label):
    fast, slow = both_ways(make_checkpoint(tmp_path, **CASES[label]), monkeypatch)
    assert snapshot(fast) == snapshot(slow)


def test_bulk_plan_without_mtp_equals_tensor_by_tensor_plan(tmp_path, monkeypatch):
    fast, slow = both_ways(make_checkpoint(tmp_path, schemes=NATIVE), monkeypatch, include_mtp=False)
    assert snapshot(fast) == snapshot(slow)


def test_bulk_plan_of_the_flash_layout_equals_tensor_by_tensor_plan(flash_dir, monkeypatch):
    fast, slow = both_ways(flash_dir, monkeypatch)
    assert fast.ok and snapshot(fast) == snapshot(slow)
    assert fast.checkpoint.tensors == slow.checkpoint.tensors


# ---- headers: the bulk validator accepts exactly what the per-entry one accepts, with the same result ----
_DTYPES = ["BF16", "F32", "F8_E4M3", "F8_E8M0", "I8", "U8", "F4", "F6_E2M3", "bf16", "X"]
_INTS = st.one_of(st.integers(0, 40), st.integers(-3, -1), st.sampled_from([True, False, 2.0, None, "4", [2]]))


@st.composite
def headers(draw):
    """A header whose entries mostly tile the data region; some entries are broken in one way or another."""
    n = draw(st.integers(1, 6))
    entries, pos = {}, 0
    for i in range(n):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        bits = fmt.DTYPE_BITS.get(dtype, 8)
        size = -(-(bits * int(torch.tensor(shape).prod())) // 8) if shape else -(-bits // 8)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
        if draw(st.integers(0, 4)) == 0:             # break something
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            entry[key] = draw(st.one_of(_INTS, st.lists(_INTS, max_size=3)))
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.sampled_from([[], "x", None, {"dtype": "BF16"}]))
        entries[f"t{draw(st.integers(0, 3)) if draw(st.booleans()) else i}.{i}"] = entry
    order = draw(st.permutations(list(entries)))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))
    return {k: entries[k] for k in order}, max(0, pos + extra)


def _parse(path, size):
    try:
        return fmt.parse_header(str(path), "f.safetensors", size)
    except CheckpointError as e:
        return str(e)


@given(h=headers())
def test_bulk_header_validation_equals_per_entry_validation(tmp_path_factory, h):
    header, data_len = h
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("h") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    size = path.stat().st_size
    fast = _parse(path, size)
    bulk, fmt._bulk_entries = fmt._bulk_entries, lambda *a: None
    try:
        slow = _parse(path, size)
    finally:
        fmt._bulk_entries = bulk
    assert fast == slow


def test_bulk_scan_equals_per_entry_scan(tmp_path, monkeypatch):
    d = make_checkpoint(tmp_path, schemes=NATIVE)
    fast = scan_checkpoint(d)
    monkeypatch.setattr(fmt, "_bulk_entries", lambda *a: None)
    assert scan_checkpoint(d) == fast


def test_the_flash_layout_takes_the_bulk_paths_throughout(flash_dir, monkeypatch):
    """The speed claim in benchmarks/plan_speed.py rests on this: no Flash tensor is handled one by one."""
    from vllm_deepseek_v4.config import load_config
    from vllm_deepseek_v4.loader import account as account_mod
    from vllm_deepseek_v4.naming import Resolver, resolve_names

    def one_by_one_used(*args):
        raise AssertionError(f"handled one by one: {args[:3]}")
    monkeypatch.setattr(fmt, "_entry", one_by_one_used)
    ck = scan_checkpoint(flash_dir)
    batches, rest = resolve_names(Resolver(load_config(str(flash_dir))), list(ck.tensors))
    assert rest == [] and sum(len(b.index) for b in batches) == len(ck.tensors) == 69_187
    slow: list[str] = []
    monkeypatch.setattr(account_mod, "_slow_module", lambda module, *args: slow.append(module))
    plan = build_plan(str(flash_dir), checkpoint=ck)
    assert slow == [] and not plan.errors and not plan.missing and len(plan.params) == 35_020


@pytest.mark.parametrize("n", [0, 1, 9, 10, 43, 61, 99, 100, 128])
def test_at_least_matches_exactly_the_digit_runs_worth_n_or_more(n):
    import re

    from vllm_deepseek_v4.naming.batch import at_least
    rx = re.compile(at_least(n) + r"\Z")
    for v in range(0, 1200):
        for s in (str(v), "0" + str(v), "00" + str(v)):
            assert bool(rx.match(s)) == (v >= n), (n, s)
