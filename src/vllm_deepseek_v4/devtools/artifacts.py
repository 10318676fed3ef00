"""Tiny synthetic DSv4 artifacts in every naming convention and quant format, for loader tests and the zoo.

The renaming here is written independently of ``naming/rules`` (explicit per-convention tables, applied
from canonical names outwards), so loading what this writes tests the rule tables rather than restating them.
"""
from __future__ import annotations

import json
import re
from math import ceil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import save_file

from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.loader.expected import LINEAR, expected_params

TINY: dict[str, Any] = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=256, hidden_size=64,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=64, qk_rope_head_dim=16,
    q_lora_rank=32, o_groups=2, o_lora_rank=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    moe_intermediate_size=32, num_hash_layers=1, num_nextn_predict_layers=1, hc_mult=4, hc_sinkhorn_iters=20,
    hc_eps=1e-6, index_n_heads=2, index_head_dim=32, index_topk=4, sliding_window=8, swiglu_limit=10.0,
    scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5,
    rms_norm_eps=1e-6, rope_theta=10000, compress_rope_theta=160000,
    rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
    max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16", compress_ratios=[0, 4, 128, 0],
)


def make_config(**overrides: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(overrides)
    return cfg


# ---- canonical tensors per scheme ----
# On-disk suffix of each canonical role, per producer flavour (quant.numerics.quantize returns canonical roles).
_DISK_SUFFIX: dict[tuple[str, str], dict[str, str]] = {
    ("fp8_block", "hf"): {"scale": "weight_scale_inv"},
    ("nvfp4", ""): {"weight": "weight_packed"},
}


def quant_roles(scheme: str, w: torch.Tensor, *, flavor: str = "") -> dict[str, torch.Tensor]:
    """The real on-disk roles of ``scheme`` for the float weight ``w [out, in]`` (upstream suffixes).

    ``flavor``: ``""`` native (fp8 e8m0 scales, DeepSeek int8 MXFP4, compressed-tensors NVFP4),
    ``"hf"`` (fp8 ``weight_scale_inv``), ``"f32"`` (fp8 float32 scales, V4-Flash-Base), ``"modelopt"`` (NVFP4).
    """
    from vllm_deepseek_v4.quant.numerics import quantize

    opts: dict[str, Any] = {}
    if scheme == "fp8_block":
        opts["scale_dtype"] = "f32" if flavor == "f32" else "e8m0"
    elif scheme == "nvfp4":
        opts.update(flavor="modelopt" if flavor == "modelopt" else "compressed-tensors", with_input_scale=True)
    parts = quantize(scheme, w, **opts)
    producer = flavor if scheme == "fp8_block" else ("modelopt" if flavor == "modelopt" else "")
    rename = _DISK_SUFFIX.get((scheme, producer), {})
    return {rename.get(role, role): t for role, t in parts.items()}


def float_tensors(cfg: dict[str, Any], *, seed: int = 0, include_mtp: bool = True) -> dict[str, torch.Tensor]:
    """The tiny model as a BF16 release holds it (upstream names, fp32 where the official checkpoint is fp32),
    scaled like ``model.init.init_random_`` so activations stay O(1). One random draw per tensor in a fixed
    order, so every scheme table quantizes *the same* weights."""
    c = DSV4Config.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in expected_params(c, include_mtp=include_mtp):
        if spec.kind == LINEAR:
            out[f"{spec.name}.weight"] = (torch.randn(spec.shape, generator=g) * spec.shape[1] ** -0.5).to(torch.bfloat16)
            continue
        if spec.name.endswith("tid2eid"):
            out[spec.name] = torch.randint(0, c.n_routed_experts, spec.shape, generator=g, dtype=torch.int64)
            continue
        leaf = spec.name.rsplit(".", 1)[-1]
        r = torch.randn(spec.shape, generator=g)
        if spec.name.endswith("norm.weight") or leaf.endswith("_scale"):
            r = 1.0 + 0.1 * r
        elif leaf.endswith("_fn"):
            r = r * spec.shape[-1] ** -0.5
        elif leaf.endswith("_base") or leaf in ("attn_sink", "ape", "bias"):
            r = 0.5 * r
        fp32 = any(k in spec.name for k in ("hc_", "attn_sink", "gate.bias", ".ape"))
        out[spec.name] = r.to(torch.float32 if fp32 else torch.bfloat16)
    return out


# The linears whose output a block adds to its streams: attention's wo_b, every expert's w2.
_BLOCK_OUTPUT = re.compile(r"(layers|mtp)\.\d+\.(attn\.wo_b|ffn\.experts\.\d+\.w2|ffn\.shared_experts\.w2)\.weight")


@torch.no_grad()
def make_draft_agree_(params: Mapping[str, torch.Tensor], cfg: DSV4Config, eps: float = 0.15,
                      eps_mtp: float | None = None, h_scale: float | None = None) -> None:
    """Make ``mtp.0`` a good (not perfect) draft of a random model, in place on its upstream-named tensors
    (a checkpoint's, or a model's ``state_dict()``).

    With the trunk's attention/MoE outputs scaled by ``eps`` the trunk is a bigram model plus an
    ``eps``-sized context term; an MTP block with ``e_proj = I``, unit ``enorm`` and the trunk's final norm
    predicts that bigram of the next token, and its own (``eps_mtp``) attention and the ``h_proj`` term
    keep its KV cache and the trunk's streams relevant (both default to ``eps / 3``). ``eps = 0`` gives a
    draft that always agrees.
    """
    eps_mtp = eps / 3 if eps_mtp is None else eps_mtp
    h_scale = eps / 3 if h_scale is None else h_scale
    for name, t in params.items():
        if _BLOCK_OUTPUT.fullmatch(name):
            t.mul_(eps if name.startswith("layers.") else eps_mtp)
    params["mtp.0.e_proj.weight"].copy_(torch.eye(cfg.dim))
    params["mtp.0.h_proj.weight"].mul_(h_scale)
    params["mtp.0.enorm.weight"].fill_(1.0)
    params["mtp.0.norm.weight"].copy_(params["norm.weight"])


def canonical_tensors(cfg: dict[str, Any], schemes: dict[str, dict[str, str]] | None = None, *, seed: int = 0,
                      flavor: str = "", include_mtp: bool = True,
                      edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny model in upstream names; ``schemes[part][group]`` picks each group's format.

    Quantized groups hold the real quantization (``quant.numerics.quantize``) of the BF16 weights of
    :func:`float_tensors` with the same ``seed`` (after ``edit``, if given), so every scheme table writes the
    same model."""
    c = DSV4Config.from_dict(cfg)
    schemes = schemes or {}
    out = float_tensors(cfg, seed=seed, include_mtp=include_mtp)
    if edit is not None:
        edit(out)
    for spec in expected_params(c, include_mtp=include_mtp):
        scheme = schemes.get(spec.part, {}).get(spec.group, "bf16") if spec.kind == LINEAR else "bf16"
        if scheme != "bf16":
            w = out.pop(f"{spec.name}.weight")
            for sfx, t in quant_roles(scheme, w, flavor=flavor).items():
                out[f"{spec.name}.{sfx}"] = t
    return out


# ---- conventions (canonical -> on disk) ----
_HF_LOCAL = [  # (canonical local regex, HF local) -- HF transformers 5.x parameter names
    (r"attn\.attn_sink$", "self_attn.sinks"), (r"attn\.wq_a\.", "self_attn.q_a_proj."),
    (r"attn\.wq_b\.", "self_attn.q_b_proj."), (r"attn\.wkv\.", "self_attn.kv_proj."),
    (r"attn\.wo_a\.", "self_attn.o_a_proj."), (r"attn\.wo_b\.", "self_attn.o_b_proj."),
    (r"attn\.q_norm\.", "self_attn.q_a_norm."), (r"attn\.kv_norm\.", "self_attn.kv_norm."),
    (r"attn\.indexer\.compressor\.wkv\.", "self_attn.compressor.indexer.kv_proj."),
    (r"attn\.indexer\.compressor\.wgate\.", "self_attn.compressor.indexer.gate_proj."),
    (r"attn\.indexer\.compressor\.ape$", "self_attn.compressor.indexer.position_bias"),
    (r"attn\.indexer\.compressor\.norm\.", "self_attn.compressor.indexer.kv_norm."),
    (r"attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.scorer.weights_proj."),
    (r"attn\.compressor\.wkv\.", "self_attn.compressor.kv_proj."),
    (r"attn\.compressor\.wgate\.", "self_attn.compressor.gate_proj."),
    (r"attn\.compressor\.ape$", "self_attn.compressor.position_bias"),
    (r"attn\.compressor\.norm\.", "self_attn.compressor.kv_norm."),
    (r"attn_norm\.", "input_layernorm."), (r"ffn_norm\.", "post_attention_layernorm."),
    (r"hc_attn_(fn|base|scale)$", r"attn_hc.\1"), (r"hc_ffn_(fn|base|scale)$", r"ffn_hc.\1"),
    (r"ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"), (r"ffn\.gate\.", "mlp.gate."),
    (r"ffn\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"ffn\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
    (r"ffn\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"ffn\.experts\.(\d+)\.w1\.", r"mlp.experts.\1.gate_proj."), (r"ffn\.experts\.(\d+)\.w3\.", r"mlp.experts.\1.up_proj."),
    (r"ffn\.experts\.(\d+)\.w2\.", r"mlp.experts.\1.down_proj."),
]
_NEMO_LOCAL = [
    (r"attn\.attn_sink$", "self_attn.sinks_param.weight"),
    (r"attn\.indexer\.compressor\.(wkv|wgate)\.", r"self_attn.compressor.indexer.\1."),
    (r"attn\.indexer\.compressor\.ape$", "self_attn.compressor.indexer.ape_param.weight"),
    (r"attn\.indexer\.compressor\.norm\.", "self_attn.compressor.indexer.kv_norm."),
    (r"attn\.indexer\.(wq_b|weights_proj)\.", r"self_attn.compressor.indexer.\1."),
    (r"attn\.compressor\.ape$", "self_attn.compressor.ape_param.weight"),
    (r"attn\.compressor\.norm\.", "self_attn.compressor.kv_norm."),
    (r"attn\.compressor\.(wkv|wgate)\.", r"self_attn.compressor.\1."),
    (r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b|q_norm|kv_norm)\.", r"self_attn.\1."),
] + [r for r in _HF_LOCAL if r[0].startswith(("attn_norm", "ffn_norm", "hc_", "ffn\\."))]


def _local(rules: list[tuple[str, str]], local: str) -> str:
    for pat, rep in rules:
        new, n = re.subn("^" + pat, rep, local)
        if n:
            return new
    return local


def rename_hf(name: str, L: int) -> str:
    """transformers' parameter names; MTP kept upstream-style under ``model.mtp.K.`` (transformers has none)."""
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight"}
    if name in top:
        return top[name]
    if name.startswith("hc_head_"):
        return "model.hc_head.hc_" + name[len("hc_head_"):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m:
        return f"model.layers.{m.group(1)}." + _local(_HF_LOCAL, m.group(2))
    return "model." + name


def rename_hf_saved(name: str, L: int) -> str:
    """What transformers' save_pretrained writes: upstream block names under model.layers, lossy attn.norm."""
    if name in ("embed.weight", "norm.weight"):
        return "model." + {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}[name]
    if name.startswith("hc_head_"):
        return "model.hc_head.hc_" + name[len("hc_head_"):]
    if name.startswith("layers."):
        return "model." + name.replace(".attn.kv_norm.", ".attn.norm.")
    return name


def rename_nemo(name: str, L: int) -> str:
    if name.startswith("mtp."):
        k, rest = name.split(".", 2)[1:]
        rest = re.sub(r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1", rest)
        return f"mtp.layers.{k}." + _local(_NEMO_LOCAL, rest)
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m:
        return f"model.layers.{m.group(1)}." + _local(_NEMO_LOCAL, m.group(2))
    return rename_hf(name, L)


def rename_vllm(name: str, L: int) -> str:
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight"}
    if name in top:
        return top[name]
    if name.startswith("hc_head_"):
        return "model." + name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        n, rest = L + int(m.group(1)), m.group(2)
        if re.match(r"^(e_proj|h_proj|enorm|hnorm|hc_head_)", rest):
            return f"model.layers.{n}.{rest}"
        if rest == "norm.weight":
            return f"model.layers.{n}.shared_head.norm.weight"
        return f"model.layers.{n}.mtp_block.{_vllm_local(rest)}"
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    return f"model.layers.{m.group(1)}.{_vllm_local(m.group(2))}" if m else name


def _vllm_local(local: str) -> str:
    local = local.replace("ffn.gate.bias", "ffn.gate.e_score_correction_bias")
    return re.sub(r"\.scale$", ".weight_scale_inv", local)


RENAMERS: dict[str, Callable[[str, int], str]] = {
    "upstream": lambda n, L: n, "hf": rename_hf, "hf_saved": rename_hf_saved, "nemo": rename_nemo, "vllm": rename_vllm,
}


def fuse_vllm(tensors: dict[str, torch.Tensor], cfg: DSV4Config) -> dict[str, torch.Tensor]:
    """vLLM's fused parameters (bf16 only here): fused_wqa_wkv, fused_wkv_wgate, gate_up_proj, w13/w2 stacks."""
    out = dict(tensors)

    def fuse(a: str, b: str, new: str) -> None:
        if a in out and b in out:
            out[new] = torch.cat([out.pop(a), out.pop(b)], 0)
    blocks = sorted({m.group(1) for n in tensors for m in [re.match(r"^(model\.layers\.\d+\.(?:mtp_block\.)?)", n)] if m})
    for p in blocks:
        fuse(p + "attn.wq_a.weight", p + "attn.wkv.weight", p + "attn.fused_wqa_wkv.weight")
        for c in ("attn.compressor.", "attn.indexer.compressor."):
            fuse(p + c + "wkv.weight", p + c + "wgate.weight", p + c + "fused_wkv_wgate.weight")
        fuse(p + "ffn.shared_experts.w1.weight", p + "ffn.shared_experts.w3.weight", p + "ffn.shared_experts.gate_up_proj.weight")
        if p + "ffn.shared_experts.w2.weight" in out:
            out[p + "ffn.shared_experts.down_proj.weight"] = out.pop(p + "ffn.shared_experts.w2.weight")
        E = cfg.n_routed_experts
        if p + "ffn.experts.0.w1.weight" in out:
            w13 = [torch.cat([out.pop(f"{p}ffn.experts.{e}.w1.weight"), out.pop(f"{p}ffn.experts.{e}.w3.weight")], 0) for e in range(E)]
            out[p + "ffn.experts.routed_experts.w13_weight"] = torch.stack(w13)
            out[p + "ffn.experts.routed_experts.w2_weight"] = torch.stack([out.pop(f"{p}ffn.experts.{e}.w2.weight") for e in range(E)])
    return out


def fuse_hf_experts(tensors: dict[str, torch.Tensor], cfg: DSV4Config, *, nemo: bool = False) -> dict[str, torch.Tensor]:
    """HF stacks experts as gate_up_proj [E, 2I, D] / down_proj [E, D, I]; NeMo transposes them."""
    out = dict(tensors)
    E = cfg.n_routed_experts
    prefixes = sorted({m.group(1) for n in tensors for m in [re.match(r"^(.*\.mlp\.experts\.)0\.gate_proj\.weight$", n)] if m})
    for p in prefixes:
        gu = torch.stack([torch.cat([out.pop(f"{p}{e}.gate_proj.weight"), out.pop(f"{p}{e}.up_proj.weight")], 0) for e in range(E)])
        dn = torch.stack([out.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
        if nemo:
            out[p + "gate_and_up_projs"], out[p + "down_projs"] = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
        else:
            out[p + "gate_up_proj"], out[p + "down_proj"] = gu, dn
    return out


def to_convention(tensors: dict[str, torch.Tensor], convention: str, cfg_dict: dict[str, Any], *,
                  fuse: bool = True) -> dict[str, torch.Tensor]:
    cfg = DSV4Config.from_dict(cfg_dict)
    renamed = {RENAMERS[convention](n, cfg.n_layers): t for n, t in tensors.items()}
    if convention == "vllm" and fuse:
        renamed = fuse_vllm(renamed, cfg)
    if convention in ("hf", "nemo") and fuse:
        renamed = fuse_hf_experts(renamed, cfg, nemo=convention == "nemo")
    return renamed


def write_artifact(path: Path | str, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], *, shards: int = 2,
                   extra_json: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` as a sharded safetensors artifact with index and config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    per = max(1, ceil(len(names) / shards))
    wmap = {}
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(path / fname))
        wmap.update({n: fname for n in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    for fname, obj in (extra_json or {}).items():
        (path / fname).write_text(json.dumps(obj, indent=1))
    return path


def make_checkpoint(path: Path | str, cfg: dict[str, Any] | None = None, *, convention: str = "upstream",
                    schemes: dict[str, dict[str, str]] | None = None, flavor: str = "", include_mtp: bool = True,
                    edit: Callable[[dict[str, torch.Tensor]], None] | None = None, shards: int = 2) -> Path:
    """One call: canonical tensors -> convention -> optional ``edit`` -> written artifact."""
    cfg = cfg or make_config()
    t = to_convention(canonical_tensors(cfg, schemes, flavor=flavor, include_mtp=include_mtp), convention, cfg)
    if edit:
        edit(t)
    return write_artifact(path, t, cfg, shards=shards)


NATIVE = {"main": {"attn": "fp8_block", "indexer": "fp8_block", "shared_experts": "fp8_block", "experts": "mxfp4"},
          "mtp.0": {"attn": "fp8_block", "shared_experts": "fp8_block", "experts": "mxfp4",
                    "e_proj": "fp8_block", "h_proj": "fp8_block"}}
