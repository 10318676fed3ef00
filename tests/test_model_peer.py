"""Peer check: our model vs transformers' ``DeepseekV4ForCausalLM`` (5.16.1 <= version < 5.20) on one tiny
upstream-format BF16 artifact (``model.safetensors`` + HF-style ``config.json``) written from our state_dict.

The tiny config has a sliding, a CSA (4), an HCA (128) and a second CSA layer, one hash layer, window 8 and
index_topk 4; 160 tokens give the HCA layer one entry and the CSA layers 40, so window, compression, top-k
selection and both routers all act. transformers renames the upstream keys itself on load
(``conversion_mapping.py``); it drops ``mtp.*`` (it has no MTP), so only main-model logits are compared.

Deliberate differences and how each is neutralised:

1. **Indexer top-k ties.** ReLU scores tie exactly (all heads at 0) more often with few index heads; we break
   ties towards the older entry (stable sort), transformers uses ``torch.topk`` whose tie order differs. The
   peer config uses ``index_n_heads = 8`` (instead of 2), which leaves no exact ties at the cut on these
   inputs. With identical tie-breaking, 2 heads match to 7.5e-7 as well (checked once by patching topk).
2. **Router precision.** We score in fp32 as the official reference does; transformers in the model dtype.
   No effect in fp32. In bf16 the rounding moves near-tied expert picks; the bf16 comparison routes every
   token to all experts (``num_experts_per_tok = n_routed_experts``), so only weights, not picks, differ.
3. **Indexer selection in bf16.** Same issue for near-tied indexer scores: the bf16 comparison sets
   ``index_topk`` above the number of entries. Selection itself is checked by the fp32 comparison.
4. **Hadamard rotation** of indexer queries/keys: applied by neither (orthonormal on both sides: no effect).
5. **QAT simulation** (FP8 fake-quant of KV and compressed entries, FP4 indexer, FP8 activation blocks): done
   by neither; this is a BF16 artifact.
6. **bf16 rounding points** (deliberate: we follow DeepSeek's reference, ``dsv4-architecture.md`` 2, 4-9 and 11;
   transformers 5.19 rounds to bf16 at more places). Where transformers rounds and we do not:
   a. RoPE: cos/sin tables cast to bf16 before the rotation (reference: fp32 ``freqs_cis``, one rounding);
   b. RMSNorm: normalised value cast to bf16, *then* times the weight in bf16 (reference: ``(w * x).to(dtype)``);
      the per-head query norm multiplies bf16 ``x`` by a bf16-rounded ``rsqrt``;
   c. attention: ``q k^T`` returned in bf16 and scaled in bf16 (reference kernel: fp32 accumulator); softmax in
      fp32, probabilities cast to bf16 before ``p v`` (the reference's flash-style kernel also feeds bf16
      exp-scores to its ``p v`` GEMM; our torch reference keeps them in fp32, kernels may round there);
   d. ``hc_post``: ``post`` and ``comb`` cast to bf16, mixing in bf16 (reference: fp32, ``type_as`` at the end);
   e. compressor: ``wkv``/``wgate`` run in bf16, pooling weights cast to bf16 (reference: fp32 rows and pooling);
   f. experts and shared expert: SwiGLU in bf16, routing weight applied after ``w2``, bf16 accumulation
      (reference: fp32 SwiGLU, weight before ``w2``, fp32 accumulation);
   g. router: logits and ``sqrtsoftplus`` in bf16 (reference: fp32);
   h. ``lm_head`` output in bf16 (reference: fp32 logits).
   Measured on this test's model and ids (torch 2.13 CPU, transformers 5.19): ours-vs-transformers 1.38e-2,
   ours-vs-fp32 0.85e-2, transformers-vs-fp32 1.13e-2 -- two roughly independent errors (sqrt(0.85^2 + 1.13^2)
   = 1.41). Reproducing transformers' rounding at any *one* of a-h changes ours-vs-transformers by at most
   0.15e-2 (b helps most: 1.24e-2); at *all eight* it is still 1.07e-2. The rest is the bf16 noise floor of this
   random model: recomputing every bf16 linear of *our own* model with fp32 accumulation (same rounding points,
   another summation order) moves its logits by 0.45e-2, and scaling one token's embedding by 1 + 2^-8 moves
   them by 0.78e-2. So no faithful choice of rounding points brings the two under 1e-2; the test asserts what
   is meaningful instead: our bf16 logits are within 1e-2 of the exact (fp32) result, at least as close as
   transformers' are, and within 2.5e-2 of transformers' (the fp32 comparison, 1e-4, is the semantic check).
7. **transformers' fp32 norm weights.** It keeps every RMSNorm weight in fp32 (``_keep_in_fp32_modules_strict``),
   so in bf16 the normed query meets a bf16 ``q_b_proj`` and CPU forward fails ("expected m1 and m2 to have the
   same dtype"). We cast those weights back to bf16 after loading, which is lossless (stored in bf16).
   In fp32 transformers 5.19 runs as is, so the fp32 bound (1e-4) is the strong check.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny import make_config, make_model
from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.model import DSV4Model

transformers = pytest.importorskip("transformers")

T = 160
PEER = {"compress_ratios": [0, 4, 128, 4, 0], "index_n_heads": 8}
NO_SELECTION = {"num_experts_per_tok": 8, "index_topk": 64}       # bf16: nothing discrete left to flip
FP32_KEYS = ("hc_", "attn_sink", "ape", "gate.bias")                # fp32 in the official checkpoint
Peer = tuple[Path, DSV4Config, dict[str, torch.Tensor]]


def write_artifact(model: DSV4Model, path: Path) -> dict[str, torch.Tensor]:
    """Upstream-format BF16 artifact of ``model``; returns the tensors written."""
    from safetensors.torch import save_file

    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() and not any(s in k for s in FP32_KEYS) else v)
          .contiguous() for k, v in model.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=1))
    return sd


def ours(cfg: DSV4Config, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> DSV4Model:
    model = DSV4Model(cfg, dtype=dtype)
    model.load_state_dict({k: (v.to(dtype) if v.dtype == torch.bfloat16 else v) for k, v in sd.items()})
    return model.eval()


def theirs(path: Path, dtype: torch.dtype) -> Any:
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    if dtype == torch.bfloat16:                                        # difference 7 in the docstring
        for module in hf.modules():
            if type(module).__name__ == "DeepseekV4RMSNorm":
                module.weight.data = module.weight.data.to(dtype)
    return hf


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    cfg = make_config(**PEER)
    path = tmp_path_factory.mktemp("peer")
    return path, cfg, write_artifact(make_model(cfg, seed=5), path)


def test_transformers_loads_every_tensor_of_our_artifact(peer: Peer) -> None:
    path, cfg, sd = peer
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                  output_loading_info=True)
    assert hf.config.layer_types == ["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention", "compressed_sparse_attention"]
    assert hf.config.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")} == \
        {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    torch.testing.assert_close(hf.lm_head.weight, sd["head.weight"].float(), rtol=0, atol=0)
    torch.testing.assert_close(hf.model.layers[0].mlp.gate.tid2eid, sd["layers.0.ffn.gate.tid2eid"])


def test_logits_match_transformers_in_fp32(peer: Peer, ids: torch.Tensor) -> None:
    path, cfg, sd = peer
    with torch.no_grad():
        want = theirs(path, torch.float32)(ids).logits
        got, _ = ours(cfg, sd, torch.float32)(ids)
    assert rel(got, want) < 1e-4, f"fp32 relative error {rel(got, want):.2e}"


def test_logits_match_transformers_in_bf16(tmp_path: Path, ids: torch.Tensor) -> None:
    cfg = make_config(**PEER, **NO_SELECTION)
    sd = write_artifact(make_model(cfg, seed=5), tmp_path)
    with torch.no_grad():
        hf = theirs(tmp_path, torch.bfloat16)(ids).logits
        got, _ = ours(cfg, sd, torch.bfloat16)(ids)
        exact, _ = ours(cfg, sd, torch.float32)(ids)
    msg = f"ours-vs-hf {rel(got, hf):.2e}, ours-vs-fp32 {rel(got, exact):.2e}, hf-vs-fp32 {rel(hf, exact):.2e}"
    assert rel(got, exact) < 1e-2, msg                   # our bf16 rounding: within the bound of exact
    assert rel(got, exact) <= rel(hf, exact), msg        # fewer rounding points (difference 6): at least as close
    assert rel(got, hf) < 2.5e-2, msg                    # two independent ~1e-2 errors (difference 6)
