"""``dsv4 check-vllm --device meta`` on the published DeepSeek-V4-Flash layout (69,187 real headers, sparse data):
vLLM's own target and MTP classes, every parameter covered, no tensor data read.

About 25-90 s on the 2-core CI box (vLLM's classes built at Flash size on ``meta``, plus the stock check).
"""
from __future__ import annotations

import importlib.util
import time

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


def test_flash_meta_check_reads_headers_only(tmp_path, monkeypatch) -> None:
    import safetensors

    from vllm_deepseek_v4.devtools import flash
    from vllm_deepseek_v4.loader import stream
    from vllm_deepseek_v4.native import check_vllm

    flash.materialise(tmp_path / "flash")

    def refuse(*a, **k):
        raise AssertionError("the meta check read tensor data")

    # headers only: any data read (our positional reader, safetensors) fails the test
    monkeypatch.setattr(stream.PositionalReader, "read", refuse)
    monkeypatch.setattr(stream.PositionalReader, "read_source", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    t0 = time.perf_counter()
    doc = check_vllm(str(tmp_path / "flash"), device="meta")
    seconds = time.perf_counter() - t0
    assert doc["ok"], (doc["problems"], doc["target"]["errors"][:5], doc["mtp"]["errors"][:5])
    for kind in ("target", "mtp"):
        j = doc[kind]
        assert j["uncovered"] == [] and j["errors"] == [] and j["quant_mismatches"] == []
        assert j["covered"] == j["params"], kind
    assert doc["target"]["params"] == 1502 and doc["mtp"]["params"] == 41
    methods = doc["mtp"]["quant_methods"]
    assert methods["model.layers.43.mtp_block.ffn.experts.routed_experts"] == "Mxfp4MoEMethod"
    assert methods["model.layers.43.e_proj"] == "Fp8LinearMethod"
    assert {s["source"] for s in doc["mtp"]["shared"].values()} == {"embed.weight", "head.weight"}
    # stock: the draft's top-level head / embed are skipped by vLLM's MTP loader (masked at PP = 1)
    assert {u["param"] for u in doc["stock"]["mtp"]["unloaded"]} == {"model.embed_tokens.weight",
                                                                     "model.layers.43.shared_head.head.weight"}
    assert seconds < 300, seconds
