"""``load_format="dummy"`` (what ``vllm bench`` and vLLM's own DSv4 generation test use): target and MTP draft
are materialised and filled like vLLM's dummy loader fills its own models (``vllm_plugin/dummy.py``).

- construct-only, every zoo layout with an MTP block (real ``VllmConfig`` from ``EngineArgs``, no engine): no
  tensor left on meta, storage dtypes as on disk, scales/globals positive and finite, ``tid2eid`` in range with
  distinct experts per token, ``weight_shape`` exact, every linear computes finite values of vLLM's dummy
  magnitude, float tensors hold exactly vLLM's ``initialize_single_dummy_weight`` values, the draft's shared
  embed/head check passes against the fill and refuses a foreign head;
- in-process ``LLM(load_format="dummy")`` with MTP k = 1 on the shipped model and a quantised zoo layout
  (ModelOpt NVFP4 experts + FP8 attention, MXFP4 draft experts): tokens come out, and they are the portable
  greedy decode of the very weights the engine holds (so the dummy model is a working model, not just a model
  that does not crash).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

import vllm_support as vs
from vllm_deepseek_v4.checkpoint.format import TORCH_DTYPE_NAMES
from vllm_deepseek_v4.devtools import zoo as build_zoo
from vllm_deepseek_v4.errors import AliasMismatchError
from vllm_deepseek_v4.model.linear import QLinear
from vllm_deepseek_v4.model.moe import Gate
from vllm_deepseek_v4.quant import SCHEMES
from vllm_deepseek_v4.quant.scheme import GLOBAL, SCALES

pytestmark = pytest.mark.slow
ZOO = [name for name, layout in build_zoo.LAYOUTS.items() if layout.has_mtp]
N = 8


@pytest.fixture(scope="module")
def zoo_paths(tmp_path_factory) -> dict[str, Any]:
    src = vs.write_model(tmp_path_factory.mktemp("dummy_src"), vs.seeded_model(2))
    floats, raw_cfg, cfg = build_zoo.read_source(str(src))
    out = tmp_path_factory.mktemp("dummy_zoo")
    paths = {}
    for name in ZOO:
        build_zoo.write_layout(out / name, name, floats, raw_cfg, cfg)
        paths[name] = out / name
    return paths


def construct(path, k: int = 1) -> tuple[Any, Any]:
    """Target and draft as vLLM's loader constructs them for ``load_format="dummy"`` (no engine)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from vllm_deepseek_v4.vllm_plugin.model import DSV4ForCausalLM
    from vllm_deepseek_v4.vllm_plugin.mtp import DSV4MTPDraft

    saved = {key: os.environ.get(key) for key in vs.ENGINE_ENV}
    os.environ.update(vs.ENGINE_ENV)
    try:
        cfg = EngineArgs(model=str(path), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                         max_model_len=256, load_format="dummy",
                         speculative_config={"method": "mtp", "num_speculative_tokens": k}).create_engine_config()
    finally:
        for key, v in saved.items():
            os.environ.pop(key) if v is None else os.environ.__setitem__(key, v)
    with set_current_vllm_config(cfg), torch.device("cpu"):
        return DSV4ForCausalLM(vllm_config=cfg), DSV4MTPDraft(vllm_config=cfg, prefix="draft.")


def check_filled_like_vllm(root: torch.nn.Module) -> dict[str, int]:
    """Every tensor below ``root`` as vLLM's dummy loader leaves it (see vllm_plugin/dummy.py)."""
    from vllm.model_executor.model_loader.weight_utils import initialize_single_dummy_weight

    seen = {"scales": 0, "codes": 0, "floats": 0, "tid2eid": 0}
    for mname, m in root.named_modules():
        for role, t in list(m._parameters.items()) + list(m._buffers.items()):
            name = f"{mname}.{role}"
            assert not t.is_meta, name
            kind = SCHEMES[m.scheme].role(role).kind if isinstance(m, QLinear) and m.scheme != "bf16" else None
            if kind in (SCALES, GLOBAL):
                v = (t.view(torch.uint8).float() if t.dtype == torch.uint8 else t.float())
                assert v.isfinite().all() and (v > 0).all(), name
                seen["scales"] += 1
            elif isinstance(m, Gate) and role == "tid2eid":
                assert 0 <= int(t.min()) and int(t.max()) < m.out_features, name
                assert all(len(set(row)) == len(row) for row in t.tolist()), name
                seen["tid2eid"] += 1
            elif t.is_floating_point() and getattr(t, "dummy_weight_value", None) is None:
                want = torch.empty_like(t)
                initialize_single_dummy_weight(want)
                assert torch.equal(t, want), name
                seen["floats"] += 1
            else:
                seen["codes"] += 1
        if isinstance(m, QLinear):
            y = m(torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0)))
            assert y.isfinite().all(), mname
            w = m(torch.eye(m.in_features)).abs().max().item()           # the dequantised weight's largest entry
            assert w <= 4e-3, (mname, m.scheme, w)     # int4 with zero points: |q - z| <= 15 times 2^-12
    return seen


@pytest.mark.parametrize("layout", ZOO)
def test_dummy_construction_materialises_and_fills_every_tensor_like_vllm(zoo_paths, layout):
    target, draft = construct(zoo_paths[layout])
    on_disk = target.plan.checkpoint.tensors
    quantised = build_zoo.LAYOUTS[layout].quant
    seen = check_filled_like_vllm(target.model)
    seen_draft = check_filled_like_vllm(draft.model)
    assert seen["tid2eid"] >= 1 and seen["floats"] > 0 and seen_draft["floats"] > 0
    if quantised:
        assert seen["scales"] > 0 and seen["codes"] > 0
    schemes = {m.scheme for m in target.model.modules() if isinstance(m, QLinear)}
    assert schemes == {"bf16"} | {s for s, _ in quantised.get("main", {}).values()}
    modules = dict(target.model.named_modules())
    for name, targets in target._router.targets.items():        # quantised roles keep their on-disk dtype
        for tgt in targets:
            owner, _, role = tgt.key.rpartition(".")
            m = modules.get(owner)
            if isinstance(m, QLinear) and m.scheme != "bf16" and not tgt.alias:
                assert str(getattr(m, role).dtype).removeprefix("torch.") == TORCH_DTYPE_NAMES[on_disk[name].dtype]
    draft.verify_shared()                                    # its embed/head are the fill the target has too
    assert torch.equal(draft.model.embed_tokens.weight, target.model.embed.weight)
    layer = draft.model.layers[str(draft.cfg.n_layers)]
    layer.shared_head.head.weight.data[0, 0] += 1.0
    with pytest.raises(AliasMismatchError, match="shared_head.head"):
        draft.verify_shared()


@pytest.fixture(scope="module")
def single_thread():
    with vs.one_torch_thread():
        yield


def _weights(worker: Any) -> dict[str, Any]:
    runner = worker.model_runner
    return {"trunk": copy.deepcopy(runner.model.model), "shared_checked": runner.drafter.model._shared_checked}


@pytest.mark.parametrize("which", ["shipped", "modelopt_mixed"])
def test_llm_with_dummy_weights_and_mtp_generates_the_greedy_tokens_of_its_weights(zoo_paths, single_thread, which):
    from vllm_deepseek_v4.assets import tiny_model_path

    path = tiny_model_path() if which == "shipped" else zoo_paths[which]
    with vs.engine(path, 1, load_format="dummy") as llm:
        got = vs.generate(llm, vs.PROMPTS, N)
        counters = vs.spec_counters(llm)
        state = vs.on_worker(llm, _weights)
    assert [len(g) for g in got] == [N] * len(vs.PROMPTS)
    assert counters["num_drafts"] > 0 and state["shared_checked"]
    trunk = state["trunk"].eval()
    assert got == [vs.greedy(trunk, p, N) for p in vs.PROMPTS]
