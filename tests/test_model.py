"""The portable DSv4 model: checkpoint-named parameters, decode == prefill, MTP contract, parts vs the spec.

Decode consistency runs in fp32 on the tiny config of ``tiny.py`` (sliding, CSA and plain-compressor layers,
a hash layer, window 8, index_topk 4) over 48 tokens, so windows, compression and top-k all matter.
Tolerance: 1e-4 absolute on logits of magnitude ~5; only summation order differs between the paths.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny import make_config, make_model
from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.errors import ConfigError, KernelUnsupportedError, TensorShapeError
from vllm_deepseek_v4.kernels import dispatch
from vllm_deepseek_v4.kernels.attention import sink_attention_ref
from vllm_deepseek_v4.model import DSV4Model, QLinear, build_model, resolve_schemes, role_layout
from vllm_deepseek_v4.model.hyper import sinkhorn
from vllm_deepseek_v4.model.primitives import apply_rope, rope_inv_freq

T = 48
ATOL = 1e-4
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "i64": torch.int64, "i8": torch.int8,
          "e4m3": torch.float8_e4m3fn, "e8m0": torch.float8_e8m0fnu}


@pytest.fixture(scope="module")
def model() -> DSV4Model:
    return make_model(seed=0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(1))


# ---- names and shapes ----
def test_state_dict_matches_published_flash_inventory() -> None:
    from vllm_deepseek_v4.devtools import flash as inv

    cfg = DSV4Config.from_dict(inv.config())
    pub = {"attn": "fp8_block", "indexer": "fp8_block", "experts": "mxfp4", "shared_experts": "fp8_block"}
    m = build_model(cfg, schemes={"main": pub, "mtp.0": {**pub, "e_proj": "fp8_block", "h_proj": "fp8_block"}})
    have = {n: (tuple(t.shape), t.dtype) for n, t in m.state_dict().items()}
    want = {n: (tuple(s), DTYPES[d]) for n, s, d, _ in inv.inventory()}
    assert sorted(set(want) ^ set(have)) == []
    assert [(n, want[n], have[n]) for n in want if want[n] != have[n]] == []


def test_tiny_shapes_follow_config(model: DSV4Model) -> None:
    cfg, sd = model.cfg, model.state_dict()
    H, d, G = cfg.n_heads, cfg.head_dim, cfg.o_groups
    assert sd["layers.1.attn.wo_a.weight"].shape == (G * cfg.o_lora_rank, H * d // G)
    assert sd["layers.1.attn.compressor.ape"].shape == (4, 2 * d)                   # overlap: c = 2
    assert sd["layers.2.attn.compressor.ape"].shape == (8, d)                       # plain: c = 1
    assert sd["layers.1.attn.indexer.compressor.wkv.weight"].shape == (2 * cfg.index_head_dim, cfg.dim)
    assert sd["layers.1.attn.indexer.compressor.norm.weight"].shape == (cfg.index_head_dim,)
    assert sd["layers.0.ffn.gate.tid2eid"].shape == (cfg.vocab_size, cfg.n_activated_experts)
    assert "layers.0.ffn.gate.bias" not in sd and "layers.1.ffn.gate.tid2eid" not in sd
    assert "mtp.0.ffn.gate.bias" in sd and "layers.0.attn.compressor.ape" not in sd
    assert not any(k.startswith("layers.2.attn.indexer") for k in sd)
    assert sd["mtp.0.hc_head_fn"].shape == (cfg.hc_mult, cfg.hc_mult * cfg.dim)


def test_mtp_holds_no_embedding_or_head(model: DSV4Model) -> None:
    sd = model.state_dict()
    assert [k for k in sd if k.startswith("mtp.") and ("embed" in k or "head.weight" in k)] == []
    assert all(p.shape[0] != model.cfg.vocab_size for p in model.mtp.parameters())


# ---- meta build and loading ----
def test_meta_build_filled_by_assign_reproduces_logits(model: DSV4Model, ids: torch.Tensor) -> None:
    meta = build_model(model.cfg, dtype=torch.float32)
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.load_state_dict(model.state_dict(), assign=True)
    torch.testing.assert_close(meta(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_meta_build_filled_tensor_by_tensor(model: DSV4Model, ids: torch.Tensor) -> None:
    meta = build_model(model.cfg, dtype=torch.float32)
    for name, t in model.state_dict().items():
        meta.load_state_dict({name: t}, strict=False, assign=True)
    torch.testing.assert_close(meta(ids)[0], model(ids)[0], rtol=0, atol=0)


# ---- decode == full forward ----
def test_token_by_token_decode_matches_full_forward(model: DSV4Model, ids: torch.Tensor) -> None:
    full, hidden = model(ids)
    state = model.new_state()
    steps = [model(ids[:, p:p + 1], state) for p in range(T)]
    torch.testing.assert_close(torch.cat([s[0] for s in steps], 1), full, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.cat([s[1] for s in steps], 1), hidden, rtol=0, atol=ATOL)
    assert state.pos == T


def test_chunked_prefill_then_decode_matches_full_forward(model: DSV4Model, ids: torch.Tensor) -> None:
    full, _ = model(ids)
    state = model.new_state()
    parts = [model(ids[:, a:b], state)[0] for a, b in ((0, 13), (13, 14), (14, 31), (31, T))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=ATOL)


def test_mtp_decode_matches_full_forward(model: DSV4Model, ids: torch.Tensor) -> None:
    _, hidden = model(ids)
    full, _ = model.forward_mtp(hidden[:, :-1], ids[:, 1:])
    state = model.new_mtp_state()
    steps = [model.forward_mtp(hidden[:, p:p + 1], ids[:, p + 1:p + 2], state)[0] for p in range(T - 1)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=ATOL)


def test_mtp_layer_takes_its_ratio_from_the_config(ids: torch.Tensor) -> None:
    model = make_model(make_config(compress_ratios=[0, 4, 8, 4, 8]), seed=2)
    assert model.mtp[0].attn.compressor.ratio == 8 and not model.mtp[0].ffn.gate.hash
    _, hidden = model(ids)
    full, _ = model.forward_mtp(hidden[:, :-1], ids[:, 1:])
    state = model.new_mtp_state()
    steps = [model.forward_mtp(hidden[:, p:p + 1], ids[:, p + 1:p + 2], state)[0] for p in range(T - 1)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=ATOL)


def test_forward_returns_streams_before_hc_head(model: DSV4Model, ids: torch.Tensor) -> None:
    from vllm_deepseek_v4.model.hyper import hc_head

    logits, hidden = model(ids)
    assert hidden.shape == (2, T, model.cfg.hc_mult, model.cfg.dim)
    y = hc_head(hidden, model.hc_head_fn, model.hc_head_base, model.hc_head_scale, hc_eps=model.cfg.hc_eps,
                norm_eps=model.cfg.norm_eps)
    torch.testing.assert_close(model.logits(model.norm(y)), logits, rtol=0, atol=0)


def test_mtp_rejects_a_post_hc_head_vector(model: DSV4Model, ids: torch.Tensor) -> None:
    with pytest.raises(TensorShapeError, match=r"^mtp\.0 input streams: expected \[2, 4, 4, 64\], found "
                                               r"\[2, 4, 64\]\. feed the main model's"):
        model.forward_mtp(torch.zeros(2, 4, 64), ids[:, :4])


def test_mtp_draft_depends_on_main_streams_and_next_token(model: DSV4Model, ids: torch.Tensor) -> None:
    _, hidden = model(ids[:, :8])
    base, _ = model.forward_mtp(hidden, ids[:, 1:9])
    other_tok, _ = model.forward_mtp(hidden, ids[:, 2:10])
    other_hid, _ = model.forward_mtp(hidden.flip(2), ids[:, 1:9])
    assert (base - other_tok).abs().amax() > 1e-2 and (base - other_hid).abs().amax() > 1e-2


# ---- layer types ----
def test_layer_schedule_builds_the_right_modules(model: DSV4Model) -> None:
    kinds = [(hasattr(b.attn, "compressor"), hasattr(b.attn, "indexer"), b.ffn.gate.hash)
             for b in [*model.layers, *model.mtp]]
    assert kinds == [(False, False, True), (True, True, False), (True, False, False), (True, True, False),
                     (False, False, False)]
    assert model.layers[1].attn.compressor.overlap and not model.layers[2].attn.compressor.overlap


def _entries(comp, x: torch.Tensor) -> torch.Tensor:
    """The compressor's entries of every complete window of a sequence ``x`` from position 0."""
    n = x.shape[1] // comp.ratio * comp.ratio
    return comp.pool(*comp.project(x[:, :n]), 0, 0, x.dtype)


def test_indexer_picks_topk_among_completed_entries(model: DSV4Model) -> None:
    attn = model.layers[1].attn
    x, qr, pos = torch.randn(1, T, 64), torch.randn(1, T, 32), torch.arange(T)
    keys = _entries(attn.indexer.compressor, x)
    visible = torch.arange(keys.shape[1])[None, :] < ((pos + 1) // 4)[:, None]
    assert torch.equal(attn.entry_visibility(pos, keys.shape[1]), visible)
    picked = attn.indexer.pick(*attn.indexer.queries(x, qr, pos), keys, visible[None])[0]   # [T, n]
    assert not (picked & ~visible).any()
    assert picked.sum(-1).tolist() == visible.sum(-1).clamp(max=4).tolist()


def test_plain_compressor_entry_is_softmax_pool_of_its_window() -> None:
    cfg = make_config()
    comp = make_model(cfg).layers[2].attn.compressor                           # ratio 8, no overlap
    x = torch.randn(1, 21, cfg.dim)
    entries = _entries(comp, x)
    assert entries.shape == (1, 2, cfg.head_dim)                               # tokens 16..20 are pending
    a, g = x[0, 8:16] @ comp.wkv.weight.T, x[0, 8:16] @ comp.wgate.weight.T + comp.ape
    c = comp.norm((g.softmax(0) * a).sum(0))
    want = apply_rope(c[None, None], torch.tensor([8]), rope_inv_freq(cfg, 8))[0, 0]
    torch.testing.assert_close(entries[0, 1], want)


def test_overlap_compressor_mixes_previous_a_halves_and_own_b_halves() -> None:
    cfg = make_config()
    comp = make_model(cfg).layers[1].attn.compressor                           # ratio 4, overlap
    hd, x = cfg.head_dim, torch.randn(1, 12, cfg.dim)
    entries = _entries(comp, x)
    a, g = x[0] @ comp.wkv.weight.T, x[0] @ comp.wgate.weight.T + comp.ape.repeat(3, 1)
    slots_a = torch.cat((a[4:8, :hd], a[8:12, hd:]))                           # window 2: A of w=1, B of w=2
    slots_g = torch.cat((g[4:8, :hd], g[8:12, hd:]))
    c = comp.norm((slots_g.softmax(0) * slots_a).sum(0))
    want = apply_rope(c[None, None], torch.tensor([8]), rope_inv_freq(cfg, 4))[0, 0]
    torch.testing.assert_close(entries[0, 2], want)
    first = comp.norm((g[0:4, hd:].softmax(0) * a[0:4, hd:]).sum(0))          # window 0: no previous slots
    torch.testing.assert_close(entries[0, 0], apply_rope(first[None, None], torch.tensor([0]),
                                                         rope_inv_freq(cfg, 4))[0, 0])


# ---- primitives ----
def test_sinkhorn_ends_column_normalised() -> None:
    c = sinkhorn(torch.randn(5, 4, 4) * 3, 20, 1e-6)
    torch.testing.assert_close(c.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.sum(-1), torch.ones(5, 4), atol=5e-2, rtol=0)   # rows: only approximately


def test_sinkhorn_numpy_path_computes_what_the_torch_loop_computes() -> None:
    logits = torch.randn(3, 7, 4, 4) * 3
    fast = sinkhorn(logits, 20, 1e-6)                          # CPU, fp32, no grad: the numpy alternation
    loop = sinkhorn(logits.clone().requires_grad_(), 20, 1e-6)  # autograd needs the torch loop
    assert loop.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, loop.detach(), atol=1e-6, rtol=0)
    assert fast.dtype == torch.float32 and fast.shape == logits.shape


def test_rope_is_interleaved_complex_rotation_and_inverse_undoes_it() -> None:
    cfg = make_config()
    f = rope_inv_freq(cfg, 0)
    x, pos = torch.randn(1, 3, 2, 24), torch.tensor([0, 5, 17])
    y = apply_rope(x, pos, f)
    z = torch.view_as_complex(x[..., 8:].reshape(1, 3, 2, 8, 2))
    want = torch.view_as_real(z * torch.polar(torch.ones(3, 8), pos[:, None] * f)[:, None]).flatten(-2)
    torch.testing.assert_close(y[..., 8:], want)
    assert torch.equal(y[..., :8], x[..., :8])
    torch.testing.assert_close(apply_rope(y, pos, f, inverse=True), x)


def test_yarn_tables_follow_flash_numbers() -> None:
    cfg = make_config(qk_rope_head_dim=64, head_dim=128)                      # Flash RoPE parameters
    base = 160000.0 ** (-torch.arange(0, 64, 2) / 64)
    f = rope_inv_freq(cfg, 4)
    torch.testing.assert_close(f[:16], base[:16])                              # k <= 15 untouched
    torch.testing.assert_close(f[25:], base[25:] / 16)                         # k >= 25 divided by factor
    torch.testing.assert_close(rope_inv_freq(cfg, 0), 10000.0 ** (-torch.arange(0, 64, 2) / 64))


# ---- MoE ----
def test_hash_layer_routes_by_tid2eid(model: DSV4Model) -> None:
    moe, x, tok = model.layers[0].ffn, torch.randn(6, 64), torch.arange(6) * 7
    w, idx = moe.route(x, tok)
    assert torch.equal(idx, moe.gate.tid2eid[tok])
    torch.testing.assert_close(w.sum(-1), torch.full((6,), model.cfg.route_scale))


def test_gate_bias_steers_selection_but_not_weights(model: DSV4Model) -> None:
    moe, x = model.layers[1].ffn, torch.randn(6, 64)
    w, idx = moe.route(x, torch.zeros(6, dtype=torch.long))
    scores = F.softplus(x @ moe.gate.weight.T).sqrt()
    assert torch.equal(idx, (scores + moe.gate.bias).topk(2).indices)
    picked = scores.gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * model.cfg.route_scale)


# ---- linear / schemes ----
@pytest.mark.parametrize("scheme", ["fp8_block", "mxfp4", "nvfp4", "w4a16"])
def test_qlinear_holds_on_disk_roles_and_matches_dequantized_matmul(scheme: str) -> None:
    numerics = pytest.importorskip("vllm_deepseek_v4.quant.numerics")
    layer = QLinear(256, 160, scheme, dtype=torch.bfloat16)                    # w4a16 scales follow dtype
    parts = numerics.quantize(scheme, torch.randn(160, 256) * 0.05)
    assert {k: (tuple(v.shape), v.dtype) for k, v in layer.parts().items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in parts.items()}
    layer.load_state_dict(parts, assign=True)
    x = torch.randn(3, 256)
    want = x @ numerics.dequantize(scheme, parts, 160, 256).T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_qlinear_fp8_block_layout() -> None:
    assert role_layout("fp8_block", 300, 200, torch.bfloat16) == {
        "weight": ((300, 200), torch.float8_e4m3fn), "scale": ((3, 2), torch.float8_e8m0fnu)}


def test_nvfp4_global_scale_roles_are_exclusive() -> None:
    layer = QLinear(32, 8, "nvfp4", dtype=torch.float32)
    layer.set_role("weight_scale_2", torch.ones(()))
    assert sorted(layer.parts()) == ["weight", "weight_scale", "weight_scale_2"]


def test_resolve_schemes_defaults_to_bf16_and_rejects_unknown_names() -> None:
    cfg = make_config()
    assert resolve_schemes(cfg, {"mtp.0": {"experts": "mxfp4"}})["mtp.0"]["experts"] == "mxfp4"
    assert set(resolve_schemes(cfg, None)["main"].values()) == {"bf16"}
    with pytest.raises(ConfigError, match=r"^schemes: expected keys among \['main', 'mtp\.0'\], found 'mtp\.1'$"):
        resolve_schemes(cfg, {"mtp.1": {}})
    with pytest.raises(ConfigError, match=r"^schemes\['main'\]: expected groups among .*found 'wq_a'$"):
        resolve_schemes(cfg, {"main": {"wq_a": "bf16"}})
    with pytest.raises(ConfigError, match=r"^schemes\['main'\]\['attn'\]: expected bf16 \| .*found 'int8'$"):
        resolve_schemes(cfg, {"main": {"attn": "int8"}})


# ---- kernels ----
def test_sink_attention_ref_is_softmax_with_an_extra_sink_logit() -> None:
    q, kv, sink = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 8), torch.randn(2)
    mask = torch.rand(1, 3, 5) > 0.3
    mask[..., 0] = True
    logits = torch.einsum("bshd,bnd->bshn", q, kv) * 0.5
    logits = torch.cat((logits.masked_fill(~mask[:, :, None], -math.inf), sink.expand(1, 3, 2)[..., None]), -1)
    want = torch.einsum("bshn,bnd->bshd", logits.softmax(-1)[..., :-1], kv)
    torch.testing.assert_close(sink_attention_ref(q, kv, mask, sink, 0.5), want)


def test_grouped_linear_is_block_diagonal() -> None:
    layer = QLinear(6, 8, dtype=torch.float32)
    layer.weight.copy_(torch.randn(8, 6))
    x = torch.randn(4, 2, 6)
    want = torch.stack([x[:, g] @ layer.weight[4 * g:4 * g + 4].T for g in range(2)], 1)
    torch.testing.assert_close(dispatch.grouped_linear(x, layer, 2), want)


def test_forcing_triton_without_a_kernel_raises() -> None:
    previous = dispatch.set_backend("triton")
    try:
        with pytest.raises(KernelUnsupportedError, match=r"^linear: expected a Triton kernel, found none "
                                                          r"registered yet\. set DSV4_KERNELS=torch or auto"):
            dispatch.linear(torch.zeros(1, 4), QLinear(4, 4, dtype=torch.float32))
    finally:
        dispatch.set_backend(previous)


def test_backend_switch_rejects_unknown_names() -> None:
    with pytest.raises(KernelUnsupportedError, match=r"^DSV4_KERNELS: expected auto \| torch \| triton, "
                                                      r"found 'cuda'\. pick a kernel backend$"):
        dispatch.set_backend("cuda")


def test_backend_is_read_from_the_environment() -> None:
    code = "from vllm_deepseek_v4.kernels import get_backend; print(get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DSV4_KERNELS": "torch"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
