"""Write a tiny DSv4 in *vLLM geometry*: small enough for CPU, shaped so vLLM's own GPU classes accept it.

vLLM's ``nvidia`` DeepSeek-V4 classes only construct for dimensions their kernels support: ``head_dim`` 512
(the fused compressor), ``index_head_dim`` 128, and 128-aligned ``hidden_size`` / ``q_lora_rank`` /
``o_lora_rank`` / ``moe_intermediate_size`` (FP8 128x128 blocks must tile every fused shard). This script
writes such a model with seeded random weights (``vllm_deepseek_v4.model.init_random_``) in the upstream BF16
release format, with every layer type: a hash + sliding layer, CSA (ratio 4, with indexer), HCA (ratio 128),
a sliding top-k layer and one MTP block. About 9 M parameters; ``scripts/build_zoo.py OUT ZOO`` turns it
into every artifact layout (``docs/native.md``).

    python scripts/vllm_geometry_model.py OUT [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from vllm_deepseek_v4.devtools.artifacts import make_config

# Every DSv4 layer type at the smallest size vLLM's GPU classes accept (see the module docstring): the test
# artifacts' tiny config with vLLM's geometry (head_dim 512, index_head_dim 128, 128-aligned dims) and the
# shipped tokenizer's vocabulary and special ids.
GEOMETRY: dict[str, Any] = make_config(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=2, head_dim=512, qk_rope_head_dim=64,
    q_lora_rank=128, o_lora_rank=128, n_routed_experts=8, moe_intermediate_size=128,
    compress_ratios=[0, 4, 128, 0, 0], index_n_heads=4, index_head_dim=128, index_topk=16, sliding_window=32,
    hidden_act="silu", max_position_embeddings=1024, vocab_size=4096, bos_token_id=0, eos_token_id=1,
    pad_token_id=2, rope_theta=10000.0, compress_rope_theta=160000.0,
)
# fp32 in the official checkpoint (hc mixers, sinks, router biases, compressor ape); bf16 elsewhere
_FP32_MARKS = ("hc_", "attn_sink", "gate.bias", ".ape")


def write_geometry_model(out: Path | str, *, seed: int = 0) -> Path:
    """Write the model to ``out`` (config.json, one safetensors file, the shipped tiny model's tokenizer)."""
    from safetensors.torch import save_file

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.config import DSV4Config
    from vllm_deepseek_v4.model import DSV4Model, init_random_

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DSV4Config.from_dict(GEOMETRY)
    model = init_random_(DSV4Model(cfg, dtype=torch.float32), seed=seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(torch.float32 if any(m in name for m in _FP32_MARKS) else torch.bfloat16)
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(GEOMETRY, indent=2) + "\n")
    tiny = Path(tiny_model_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / f).is_file():
            shutil.copy2(tiny / f, out / f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = write_geometry_model(args.out, seed=args.seed)
    n = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(path / "model.safetensors")).values())
    print(f"wrote {path} ({n / 1e6:.2f} M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
