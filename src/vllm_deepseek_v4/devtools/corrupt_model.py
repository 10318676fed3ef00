"""Corpus cases about the model rather than the files: config, tensor names/shapes/dtypes, the MTP block, quant
companions, and the benign changes that must load to the base's logits (``corrupt`` has the record)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

from .corrupt import INDEX, Base, Case, edit_config, edit_element, edit_header, edit_tensors

__all__ = ["config_cases", "tensor_cases", "mtp_cases", "quant_cases", "value_cases", "benign_cases"]

CFG = "config.json"


# ---- config.json ----
def _put(**values: Any) -> Callable[[dict], None]:
    return lambda cfg: cfg.update(values)


def _drop(*keys: str) -> Callable[[dict], None]:
    def fn(cfg: dict) -> None:
        for k in keys:
            cfg.pop(k)
    return fn


def _config_file(make: Callable[[Path], None]) -> Callable[[Path], Path]:
    def mutate(d: Path) -> Path:
        (d / CFG).unlink()
        make(d / CFG)
        return d
    return mutate


def config_cases() -> list[Case]:
    def c(id: str, mutate: Callable, *expect: str, load: bool = False) -> Case:
        return Case("config", id, "tiny", mutate, (*expect,), load=load)

    def e(id: str, fn: Callable, *expect: str, load: bool = False) -> Case:
        return c(id, edit_config(fn), CFG, *expect, load=load)
    cases = [
        c("missing", _config_file(lambda p: None), CFG, "no config.json", load=True),
        c("directory", _config_file(Path.mkdir), CFG, "a directory"),
        c("fifo", _config_file(lambda p: os.mkfifo(p)), CFG, "not a regular file"),
        c("dangling-link", _config_file(lambda p: os.symlink("gone.json", p)), CFG, "dangling or looping"),
        c("not-json", edit_config(None, text="{\"hidden_size\": 128,"), CFG, "not valid JSON"),
        c("empty", edit_config(None, text=""), CFG, "not valid JSON"),
        c("not-utf8", edit_config(None, text=b'{"hidden_size": "\xff"}'), CFG, "not valid JSON"),
        c("cut-short", edit_config(None, text='{"hidden_size": NaN'), CFG, "not valid JSON"),
        c("null", edit_config(None, text="null"), CFG, "expected a JSON object", "found NoneType"),
        e("a-list", lambda cfg: [cfg], "expected a JSON object", "found list"),
        e("a-string", lambda cfg: "deepseek_v4", "found str"),
        e("a-number", lambda cfg: 0, "found int"),
    ]
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "q_lora_rank", "o_groups",
                "o_lora_rank", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
        cases.append(e(f"missing-{key}", _drop(key), key, "required"))
    cases += [
        e("missing-compress-ratios", _drop("compress_ratios"), "compress_ratios or layer_types"),
        e("hidden-size-string", _put(hidden_size="128"), "hidden_size", "a JSON number", "'128'"),
        e("hidden-size-fraction", _put(hidden_size=128.5), "hidden_size", "an integer", "128.5"),
        e("hidden-size-bool", _put(hidden_size=True), "hidden_size", "a JSON number"),
        e("hidden-size-list", _put(hidden_size=[128]), "hidden_size", "a JSON number"),
        e("layers-string", _put(num_hidden_layers="5"), "num_hidden_layers", "a JSON number"),
        e("compress-ratios-string", _put(compress_ratios="0,4,128,4,0,0"), "compress_ratios", "a JSON array"),
        e("compress-ratios-item", _put(compress_ratios=[0, "4", 128, 4, 0, 0]), "compress_ratios", "'4'"),
        e("compress-ratios-short", _put(compress_ratios=[0, 4]), "compress_ratios", ">= 5 entries"),
        e("compress-ratio-negative", _put(compress_ratios=[0, -4, 128, 4, 0, 0]), "compress_ratios", ">= 0"),
        e("rope-scaling-list", _put(rope_scaling=[16]), "rope_scaling", "a JSON object"),
        e("rope-factor-string", lambda cfg: cfg["rope_scaling"].update(factor="16"), "rope_scaling.factor"),
        e("quantization-config-string", _put(quantization_config="fp8"), "quantization_config", "a JSON object"),
        e("norm-topk-string", _put(norm_topk_prob="yes"), "norm_topk_prob", "true/false"),
        e("eps-infinite", _put(rms_norm_eps=1e999), "rms_norm_eps", "finite"),
        e("text-config-number", lambda cfg: {"text_config": 5}, "text_config", "a JSON object"),
        e("hidden-size-zero", _put(hidden_size=0), "hidden_size", "positive"),
        e("o-groups-zero", _put(o_groups=0), "o_groups", "positive"),
        e("o-groups-not-divisor", _put(o_groups=3), "o_groups", "a divisor of n_heads=4"),
        e("topk-over-experts", _put(num_experts_per_tok=9), "num_experts_per_tok", "at most n_routed_experts=8"),
        e("mtp-negative", _put(num_nextn_predict_layers=-1), "num_nextn_predict_layers", ">= 0"),
        e("rope-dim-over-head", _put(qk_rope_head_dim=65), "qk_rope_head_dim", "head_dim=64"),
        # consistent by themselves, inconsistent with the tensors: planning names the tensor or parameter
        # layers.{L} is where vLLM's names put MTP layer 0: the last layer's tensors now fill the MTP parameters
        # a second time
        c("fewer-layers", edit_config(_put(num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0])),
          "mtp.0.attn.attn_sink", "layers.4.attn.attn_sink", "mtp.0.attn.attn_sink (model.safetensors)",
          "filled by 2 tensors", load=True),
        c("more-layers", edit_config(_put(num_hidden_layers=6, compress_ratios=[0, 4, 128, 4, 0, 0, 0])),
          "config.json: num_hidden_layers: expected 5 (decoder layers 0-4 on disk, none above), found 6", load=True),
        c("no-mtp-layers", edit_config(_put(num_nextn_predict_layers=0, compress_ratios=[0, 4, 128, 4, 0])),
          "mtp.0.e_proj.weight", "unmapped"),
        c("two-mtp-layers", edit_config(_put(num_nextn_predict_layers=2, compress_ratios=[0, 4, 128, 4, 0, 0, 0])),
          "config.json: num_nextn_predict_layers: expected 1 (MTP layers 0-0 on disk, none above), found 2"),
        c("hidden-size-256", edit_config(_put(hidden_size=256)),
          "config.json: hidden_size: expected 128 (embed.weight is [4096, 128] in model.safetensors), found 256",
          load=True),
        c("hidden-size-256-tensors", edit_config(_put(hidden_size=256)), "model.safetensors: norm.weight",
          "expected shape [256]"),
        c("vocab-8192", edit_config(_put(vocab_size=8192)), "config.json: vocab_size: expected 4096", "embed.weight"),
        c("fewer-experts", edit_config(_put(n_routed_experts=4, num_experts_per_tok=2)),
          "layers.1.ffn.experts.4.w1.weight", "unmapped"),
        c("more-experts", edit_config(_put(n_routed_experts=16)),
          "config.json: n_routed_experts: expected 8 (routed experts 0-7 on disk, none above), found 16"),
        # huge counts: one line naming the field, checked before the parameter space is built (built in full,
        # 10^6 experts or MTP layers were a MemoryError or millions of "missing" lines)
        c("experts-1e6", edit_config(_put(n_routed_experts=10**6)),
          "config.json: n_routed_experts: expected 8 (routed experts 0-7 on disk, none above), found 1000000"),
        c("experts-5e6", edit_config(_put(n_routed_experts=5 * 10**6)),
          "config.json: n_routed_experts: expected 8", "found 5000000", load=True),
        c("mtp-layers-1e5", edit_config(_put(num_nextn_predict_layers=10**5)),
          "config.json: num_nextn_predict_layers: expected 1 (MTP layers 0-0 on disk, none above), found 100000"),
        c("mtp-layers-1e6", edit_config(_put(num_nextn_predict_layers=10**6)),
          "config.json: num_nextn_predict_layers: expected 1", "found 1000000", load=True),
        c("layers-1e6", edit_config(_put(num_hidden_layers=10**6, compress_ratios=[0, 4, 128, 4, 0] + [0] * (10**6 - 5))),
          "config.json: num_hidden_layers: expected 5 (decoder layers 0-4 on disk, none above), found 1000000"),
        c("moe-inter-32", edit_config(_put(moe_intermediate_size=32)), "layers.1.ffn.experts.0.w1.weight", "shape"),
        c("no-hash-layer", edit_config(_put(num_hash_layers=0)), "layers.0.ffn.gate.tid2eid", "unmapped"),
        c("two-hash-layers", edit_config(_put(num_hash_layers=2)), "layers.1.ffn.gate.tid2eid", "missing"),
        c("heads-8", edit_config(_put(num_attention_heads=8)), "layers.0.attn.wq_b.weight", "shape"),
    ]
    return cases


# ---- tensors: names, shapes, dtypes ----
def _rename(old: str, new: str) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(new, t.pop(old))


def _drop_t(*names: str) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        for n in names:
            t.pop(n)
    return fn


def _change(name: str, how: Callable[[Any], Any]) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(name, how(t[name]))


def tensor_cases() -> list[Case]:
    import torch

    def c(id: str, fn: Callable, *expect: str, load: bool = False) -> Case:
        return Case("tensors", id, "tiny", edit_tensors(fn), (*expect,), load=load)
    w, n = "layers.1.attn.wq_a.weight", "layers.1.attn_norm.weight"
    return [
        c("typo", _rename(w, "layers.1.attn.wqa.weight"), "layers.1.attn.wqa.weight", "matches no naming rule",
          load=True),
        c("unknown-suffix", _rename(w, "layers.1.attn.wq_a.weight_v2"), "layers.1.attn.wq_a.weight_v2", "unmapped"),
        c("swapped-segments", _rename(w, "layers.1.wq_a.attn.weight"), "layers.1.wq_a.attn.weight", "unmapped"),
        c("typo-leaves-missing", _rename(w, "layers.1.attn.wqa.weight"), "layers.1.attn.wq_a", "missing"),
        c("dropped-norm", _drop_t("norm.weight"), "norm.weight", "missing", load=True),
        c("dropped-expert", _drop_t("layers.2.ffn.experts.3.w2.weight"), "layers.2.ffn.experts.3.w2", "missing"),
        c("dropped-tid2eid", _drop_t("layers.0.ffn.gate.tid2eid"), "layers.0.ffn.gate.tid2eid", "missing"),
        c("extra-tensor", lambda t: t.__setitem__("layers.1.attn.extra.weight", t[w].clone()),
          "layers.1.attn.extra.weight", "unmapped"),
        c("layer-out-of-range", lambda t: t.__setitem__("layers.9.attn_norm.weight", t[n].clone()),
          "layers.9.attn_norm.weight", "unmapped"),
        c("expert-out-of-range", lambda t: t.__setitem__("layers.1.ffn.experts.8.w1.weight",
                                                         t["layers.1.ffn.experts.0.w1.weight"].clone()),
          "layers.1.ffn.experts.8.w1.weight", "unmapped"),
        c("norm-half", _change(n, lambda x: x[:64].clone()), n, "shape", load=True),
        c("wq-a-transposed", _change(w, lambda x: x.t().contiguous()), w, "shape"),
        c("embed-short", _change("embed.weight", lambda x: x[:100].clone()), "embed.weight", "shape"),
        c("norm-int32", _change(n, lambda x: x.to(torch.int32)), n, "I32", load=True),
        c("tid2eid-float", _change("layers.0.ffn.gate.tid2eid", lambda x: x.float()), "layers.0.ffn.gate.tid2eid",
          "F32"),
        c("norm-bool", _change("norm.weight", lambda x: x.bool()), "norm.weight", "BOOL"),
        c("two-spellings", lambda t: t.__setitem__("model.layers.1.input_layernorm.weight", t[n].clone()),
          "layers.1.attn_norm", "model.layers.1.input_layernorm.weight"),
        c("hc-fn-1d", _change("layers.1.hc_attn_fn", lambda x: x.flatten().clone()), "layers.1.hc_attn_fn", "shape"),
    ]


# ---- the MTP block ----
def mtp_cases() -> list[Case]:
    def c(id: str, fn: Callable, *expect: str, load: bool = False) -> Case:
        return Case("mtp", id, "tiny", edit_tensors(fn), (*expect,), load=load)

    def drop_mtp(t: dict) -> None:
        for k in [k for k in t if k.startswith("mtp.")]:
            t.pop(k)

    def dspark(t: dict) -> None:
        for k in [k for k in t if k.startswith("mtp.0.e_proj") or k.startswith("mtp.0.enorm")]:
            t[k.replace("mtp.0.", "mtp.0.markov_head.")] = t.pop(k)

    def second_layer(t: dict) -> None:
        for k in [k for k in t if k.startswith("mtp.0.")]:
            t["mtp.1." + k[6:]] = t[k].clone()
    return [
        c("dropped-block", drop_mtp, "mtp.*", "num_nextn_predict_layers=1", load=True),
        c("dropped-e-proj", _drop_t("mtp.0.e_proj.weight"), "mtp.0.e_proj", "missing", load=True),
        c("dropped-enorm", _drop_t("mtp.0.enorm.weight"), "mtp.0.enorm.weight", "missing"),
        c("dropped-hc-head", _drop_t("mtp.0.hc_head_fn"), "mtp.0.hc_head_fn", "missing"),
        c("enorm-in-main-layer", lambda t: t.__setitem__("layers.1.enorm.weight", t["mtp.0.enorm.weight"].clone()),
          "layers.1.enorm.weight"),
        c("second-layer-undeclared", second_layer, "mtp.1.e_proj.weight", "unmapped"),
        c("dspark-drafter", dspark, "mtp.0.markov_head.e_proj.weight", "DSpark"),
        c("head-alias-misshaped", lambda t: t.__setitem__("mtp.0.head.weight", t["head.weight"][:100].clone()),
          "mtp.0.head.weight"),
        c("e-proj-misshaped", _change("mtp.0.e_proj.weight", lambda x: x[:64].clone()), "mtp.0.e_proj.weight",
          "shape"),
    ]


# ---- quant companions (on the FP8 + MXFP4 layout) ----
def quant_cases(quant: Base) -> list[Case]:
    import torch

    def c(id: str, fn: Callable, *expect: str, load: bool = False) -> Case:
        return Case("quant", id, "quant", edit_tensors(fn), (*expect,), load=load)
    fp8, mx, sh = "layers.1.attn.wq_a", "layers.1.ffn.experts.0.w1", "layers.1.ffn.shared_experts.w2"
    wp = "layers.1.attn.indexer.weights_proj"
    return [
        c("fp8-scale-missing", _drop_t(f"{fp8}.scale"), f"{fp8}.weight", load=True),
        c("mxfp4-scale-missing", _drop_t(f"{mx}.scale"), f"{mx}.weight"),
        c("shared-scale-missing", _drop_t(f"{sh}.scale"), f"{sh}.weight"),
        c("mtp-scale-missing", _drop_t("mtp.0.e_proj.scale"), "mtp.0.e_proj.weight"),
        c("fp8-scale-misshaped", _change(f"{fp8}.scale", lambda x: torch.cat([x, x])), f"{fp8}.scale", load=True),
        c("mxfp4-scale-misshaped", _change(f"{mx}.scale", lambda x: x[:, :2].clone()), f"{mx}.scale"),
        c("fp8-weight-misshaped", _change(f"{fp8}.weight", lambda x: x[:32].clone()), f"{fp8}.weight"),
        c("mxfp4-weight-misshaped", _change(f"{mx}.weight", lambda x: x[:, :32].clone()), f"{mx}.weight"),
        c("scale-on-norm", lambda t: t.__setitem__("layers.1.attn_norm.scale", t[f"{fp8}.scale"].clone()),
          "layers.1.attn_norm.scale"),
        c("stray-weight-scale-2", lambda t: t.__setitem__(f"{fp8}.weight_scale_2", torch.ones(1)),
          f"{fp8}.weight_scale_2"),
        c("stray-input-scale", lambda t: t.__setitem__(f"{fp8}.input_scale", torch.ones(1)), f"{fp8}.input_scale"),
        c("fp8-weight-as-int8", _change(f"{fp8}.weight", lambda x: x.view(torch.int8)), f"{fp8}"),
        c("scale-without-weight", _drop_t(f"{fp8}.weight"), f"{fp8}"),
        # well-formed modules the portable engine cannot build: a quant group mixing schemes (headers pass the
        # plan, which is per module; verify and the load refuse, naming the odd module)
        c("weights-proj-fp8", _quantize_fp8(f"{wp}.weight"), f"{wp}.weight", "quant group 'router'", load=True),
        c("attn-layer-left-bf16", _dequantize_fp8(fp8), f"{fp8}.weight", "quant group 'attn'", load=True),
    ]


def _quantize_fp8(weight: str) -> Callable[[dict], None]:
    """A BF16 ``weight`` stored FP8 block (weight + e8m0 scale), as a quantizer that skips only ``ffn.gate`` does."""
    def fn(t: dict) -> None:
        from ..quant import fp8_block
        for role, x in fp8_block.quantize(t[weight]).items():
            t[weight[:-len("weight")] + role] = x
    return fn


def _dequantize_fp8(module: str) -> Callable[[dict], None]:
    """An FP8 block ``module`` stored BF16 (a quantizer told to skip it)."""
    def fn(t: dict) -> None:
        import torch

        from ..quant import fp8_block
        w, s = t[f"{module}.weight"], t.pop(f"{module}.scale")
        t[f"{module}.weight"] = fp8_block.dequantize({"weight": w, "scale": s}, *w.shape, torch.bfloat16)
    return fn


# ---- values: headers fine, one element bad (``dsv4 verify --values``, the load's value checks) ----
_BF16_NAN, _BF16_INF, _BF16_NEG_INF = b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"


def value_cases(quant: Base) -> list[Case]:
    def c(base: str, tensor: str, index: int, value: bytes, id: str, load: bool = False) -> Case:
        file = "model.safetensors" if base == "tiny" else quant.file_of(tensor)
        return Case("values", f"{base}-{id}", base, edit_element(file, tensor, index, value),
                    (f"{tensor} in {file}", f"flat index {index}"), load=load, values=True)
    gate = "layers.0.ffn.gate.tid2eid"
    return [
        c("tiny", "head.weight", 70, _BF16_NAN, "head-nan", load=True),
        c("tiny", "embed.weight", 4095, _BF16_INF, "embed-inf"),
        c("tiny", "norm.weight", 0, _BF16_NAN, "norm-nan"),
        c("tiny", "layers.1.hc_attn_fn", 5, struct.pack("<f", float("nan")), "hc-fn-nan", load=True),
        c("tiny", "mtp.0.enorm.weight", 3, _BF16_NEG_INF, "mtp-enorm-minus-inf"),
        c("tiny", "mtp.0.hc_head_scale", 0, struct.pack("<f", float("inf")), "mtp-hc-scale-inf"),
        c("tiny", gate, 3, struct.pack("<q", 8), "tid2eid-past-end", load=True),
        c("tiny", gate, 0, struct.pack("<q", -1), "tid2eid-negative"),
        c("quant", "layers.1.attn.wq_a.weight", 7, b"\x7f", "fp8-nan-code", load=True),
        c("quant", "mtp.0.e_proj.weight", 100, b"\xff", "mtp-fp8-nan-code"),
        c("quant", "layers.1.attn.wq_a.scale", 0, b"\xff", "e8m0-scale-nan"),
        c("quant", "layers.2.ffn.experts.3.w2.scale", 9, b"\xff", "mxfp4-scale-nan"),
        c("quant", "layers.1.attn.wkv.weight", 0, b"\xff", "fp8-first-element"),
    ]


# ---- benign: must verify and load to the base's logits ----
def _hf_cache(d: Path) -> Path:
    """The Hugging Face cache layout: ``snapshots/<rev>/FILE`` are relative links to ``blobs/<sha256>``."""
    blobs, snap = d / "blobs", d / "snapshots" / ("0" * 40)
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        os.replace(f, blobs / digest)
        os.symlink(os.path.relpath(blobs / digest, snap), snap / f.name)
    return snap


def _add_index(d: Path) -> Path:
    from .corrupt import read_header
    header, _ = read_header(d / "model.safetensors")
    header.pop("__metadata__", None)
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in header}}))
    return d


def _reverse_header(file: str) -> Callable[[Path], Path]:
    """List the header's entries in reverse (the data stays in place: header order is not data order)."""
    return edit_header(file, lambda h: dict(reversed(list(h.items()))))


def benign_cases(quant: Base) -> list[Case]:
    import torch

    def reorder(t: dict) -> None:
        items = list(t.items())
        t.clear()
        t.update(reversed(items))

    def f32(t: dict) -> None:
        for k, v in t.items():
            if v.dtype == torch.bfloat16:
                t[k] = v.float()

    def b(id: str, base: str, mutate: Callable) -> Case:
        return Case("benign", id, base, mutate, benign=True)
    return [
        b("tiny-three-shards", "tiny", edit_tensors(lambda t: None, shards=3, index=True)),
        b("tiny-reordered-data", "tiny", edit_tensors(reorder)),
        b("tiny-reordered-header", "tiny", _reverse_header("model.safetensors")),
        b("tiny-hf-cache", "tiny", _hf_cache),
        b("tiny-index-beside-single-file", "tiny", _add_index),
        b("tiny-f32-weights", "tiny", edit_tensors(f32)),
        # an e8m0 scale written as F32 holds the same powers of two
        b("quant-fp8-scale-f32", "quant", edit_tensors(lambda t: t.__setitem__(
            "layers.1.attn.wq_a.scale", t["layers.1.attn.wq_a.scale"].float()))),
        b("quant-one-file", "quant", edit_tensors(lambda t: None, shards=1, index=False)),
        b("quant-hf-cache", "quant", _hf_cache),
        b("quant-reordered-header", "quant", _reverse_header(quant.files[1])),
    ]
