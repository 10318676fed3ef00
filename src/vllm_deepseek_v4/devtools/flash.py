"""The published DeepSeek-V4-Flash checkpoint layout, without its 149 GB of weights.

``inventory()`` lists the 69,187 tensors of the public release -- name, shape, dtype and shard -- and
``materialise(out_dir)`` writes them as a *sparse* artifact: real safetensors headers and index, data left as
holes of zeros (about 13 MB on disk), plus the published ``config.json``. Planning, scanning and inspecting such
an artifact exercises exactly what the real release does; nothing here ever reads the data.

Names, shapes and dtypes follow the release (``docs/checkpoint-formats.md`` §2 and §6.1-6.2). Decoder
layers are spread over shards 1-43 one or two at a time (an approximation: only the totals and the shards of
``embed`` (1), the top-level head (45) and ``mtp.0`` (46) are as published).

    python -m vllm_deepseek_v4.devtools.flash sparse DIR      # config.json + model-*.safetensors + index
    python -m vllm_deepseek_v4.devtools.flash json OUT.json   # [[name, shape, dtype, file], ...]
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any

__all__ = ["DTYPES", "Row", "config", "inventory", "materialise"]

Row = tuple[str, list[int], str, str]          # (tensor name, shape, dtype key, shard file)

# dtype key -> (safetensors dtype code, bytes per element); u8/i32 serve derived (NVFP4, W4A16) variants.
DTYPES: dict[str, tuple[str, int]] = {
    "bf16": ("BF16", 2), "f32": ("F32", 4), "i64": ("I64", 8), "i32": ("I32", 4), "i8": ("I8", 1),
    "u8": ("U8", 1), "e4m3": ("F8_E4M3", 1), "e8m0": ("F8_E8M0", 1),
}

# Flash dimensions (docs/dsv4-architecture.md §1.1).
D, H, Q_LORA, VOCAB, L, E, SHARDS = 4096, 64, 1024, 129280, 43, 256, 46
HC = 4 * D                                        # hc_mult * hidden: the hyper-connection mixers' input width
I_MOE = 2048                                      # moe_intermediate_size (routed and shared experts)
RATIOS = [0, 0] + [4, 128] * 20 + [4]             # compress_ratios[:L]; the MTP layer's entry (0) is appended


def _fp8(out: int, inp: int) -> tuple[list[int], list[int]]:
    """FP8 block linear: e4m3 weight ``[out, in]``, e8m0 scale per 128x128 block (§6.1)."""
    return [out, inp], [-(-out // 128), -(-inp // 128)]


def _fp4(out: int, inp: int) -> tuple[list[int], list[int]]:
    """FP4 expert: two e2m1 codes per int8 ``[out, in/2]``, one e8m0 scale per 32 input columns (§6.2)."""
    return [out, inp // 2], [out, inp // 32]


def _block(prefix: str, ratio: int, *, hash_layer: bool) -> list[tuple[str, list[int], str]]:
    """Every tensor of one decoder block under ``prefix`` (``layers.N.`` or ``mtp.K.``)."""
    rows: list[tuple[str, list[int], str]] = []

    def add(name: str, shape: list[int], dt: str) -> None:
        rows.append((prefix + name, shape, dt))

    def linear(name: str, layout: tuple[list[int], list[int]], dt: str) -> None:
        add(f"{name}.weight", layout[0], dt)
        add(f"{name}.scale", layout[1], "e8m0")

    add("attn.attn_sink", [H], "f32")
    add("attn.kv_norm.weight", [512], "bf16")
    add("attn.q_norm.weight", [Q_LORA], "bf16")
    for name, (out, inp) in (("wq_a", (Q_LORA, D)), ("wq_b", (H * 512, Q_LORA)), ("wkv", (512, D)),
                             ("wo_a", (8 * 1024, H * 512 // 8)), ("wo_b", (D, 8 * 1024))):
        linear(f"attn.{name}", _fp8(out, inp), "e4m3")
    add("attn_norm.weight", [D], "bf16")
    add("ffn_norm.weight", [D], "bf16")
    for e in range(E):
        for w, (out, inp) in (("w1", (I_MOE, D)), ("w2", (D, I_MOE)), ("w3", (I_MOE, D))):
            linear(f"ffn.experts.{e}.{w}", _fp4(out, inp), "i8")
    add("ffn.gate.weight", [E, D], "bf16")
    if hash_layer:
        add("ffn.gate.tid2eid", [VOCAB, 6], "i64")
    else:
        add("ffn.gate.bias", [E], "f32")
    for w, (out, inp) in (("w1", (I_MOE, D)), ("w2", (D, I_MOE)), ("w3", (I_MOE, D))):
        linear(f"ffn.shared_experts.{w}", _fp8(out, inp), "e4m3")
    for site in ("attn", "ffn"):
        add(f"hc_{site}_fn", [24, HC], "f32")
        add(f"hc_{site}_base", [24], "f32")
        add(f"hc_{site}_scale", [3], "f32")
    if ratio == 4:                                # CSA: overlapping compressor (2 x 512 wide) + indexer
        add("attn.compressor.ape", [4, 1024], "f32")
        add("attn.compressor.wkv.weight", [1024, D], "bf16")
        add("attn.compressor.wgate.weight", [1024, D], "bf16")
        add("attn.compressor.norm.weight", [512], "bf16")
        add("attn.indexer.compressor.ape", [4, 256], "f32")
        add("attn.indexer.compressor.norm.weight", [128], "bf16")
        add("attn.indexer.compressor.wkv.weight", [256, D], "bf16")
        add("attn.indexer.compressor.wgate.weight", [256, D], "bf16")
        add("attn.indexer.weights_proj.weight", [64, D], "bf16")
        linear("attn.indexer.wq_b", _fp8(64 * 128, Q_LORA), "e4m3")
    elif ratio == 128:                            # HCA: plain compressor, no indexer
        add("attn.compressor.ape", [128, 512], "f32")
        add("attn.compressor.wkv.weight", [512, D], "bf16")
        add("attn.compressor.wgate.weight", [512, D], "bf16")
        add("attn.compressor.norm.weight", [512], "bf16")
    return rows


def _shard(i: int) -> str:
    return f"model-{i:05d}-of-{SHARDS:05d}.safetensors"


def inventory() -> list[Row]:
    """``[(name, shape, dtype key, shard file)]`` of the published Flash release, in shard order."""
    out: list[Row] = [("embed.weight", [VOCAB, D], "bf16", _shard(1))]
    for i in range(L):
        f = _shard(1 + i * (SHARDS - 2) // L)
        out += [(n, s, dt, f) for n, s, dt in _block(f"layers.{i}.", RATIOS[i], hash_layer=i < 3)]
    top = [("head.weight", [VOCAB, D], "bf16"), ("norm.weight", [D], "bf16"), ("hc_head_fn", [4, HC], "f32"),
           ("hc_head_base", [4], "f32"), ("hc_head_scale", [1], "f32")]
    out += [(n, s, dt, _shard(SHARDS - 1)) for n, s, dt in top]
    mtp = _block("mtp.0.", 0, hash_layer=False)
    for proj in ("e_proj", "h_proj"):
        w, s = _fp8(D, D)
        mtp += [(f"mtp.0.{proj}.weight", w, "e4m3"), (f"mtp.0.{proj}.scale", s, "e8m0")]
    mtp += [(f"mtp.0.{n}.weight", [D], "bf16") for n in ("enorm", "hnorm", "norm")]
    mtp += [("mtp.0.hc_head_fn", [4, HC], "f32"), ("mtp.0.hc_head_base", [4], "f32"), ("mtp.0.hc_head_scale", [1], "f32")]
    out += [(n, s, dt, _shard(SHARDS)) for n, s, dt in mtp]
    return out


def config() -> dict[str, Any]:
    """The published HF-style ``config.json`` of DeepSeek-V4-Flash (docs/dsv4-architecture.md §1.1)."""
    return dict(
        architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=VOCAB, hidden_size=D,
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64,
        q_lora_rank=Q_LORA, o_groups=8, o_lora_rank=1024, n_routed_experts=E, n_shared_experts=1,
        num_experts_per_tok=6, moe_intermediate_size=I_MOE, num_hash_layers=3, num_nextn_predict_layers=1,
        hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, index_n_heads=64, index_head_dim=128, index_topk=512,
        sliding_window=128, swiglu_limit=10.0, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
        norm_topk_prob=True, routed_scaling_factor=1.5, rms_norm_eps=1e-6, rope_theta=10000,
        compress_rope_theta=160000,
        rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
        max_position_embeddings=1048576, tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=0,
        eos_token_id=1, hidden_act="silu", compress_ratios=RATIOS + [0],
        quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", scale_fmt="ue8m0",
                                 weight_block_size=[128, 128]))


def materialise(out_dir: str | os.PathLike[str], rows: list[Row] | None = None, *,
                cfg: dict[str, Any] | None = None) -> None:
    """Write ``rows`` (default: ``inventory()``) as a sparse safetensors artifact with its index and
    ``config.json`` (default: ``config()``). Data regions are file holes: only the headers take space."""
    os.makedirs(out_dir, exist_ok=True)
    by_file: dict[str, list[tuple[str, list[int], str]]] = {}
    for name, shape, dt, f in inventory() if rows is None else rows:
        by_file.setdefault(f, []).append((name, shape, dt))
    weight_map: dict[str, str] = {}
    for f, tensors in by_file.items():
        header: dict[str, Any] = {}
        offset = 0
        for name, shape, dt in tensors:
            code, itemsize = DTYPES[dt]
            size = itemsize
            for n in shape:
                size *= n
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = f
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                       # data starts 8-byte aligned
        with open(os.path.join(out_dir, f), "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            fh.truncate(8 + len(blob) + offset)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config() if cfg is None else cfg, fh, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("sparse", "json"):
        usage = [line.strip() for line in __doc__.strip().splitlines()[-2:]]
        print("usage:\n  " + "\n  ".join(usage), file=sys.stderr)
        return 2
    verb, dest = args
    if verb == "sparse":
        materialise(dest)
    else:
        with open(dest, "w") as fh:
            json.dump([list(r) for r in inventory()], fh)
    print(f"DeepSeek-V4-Flash: {len(inventory())} tensors -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
