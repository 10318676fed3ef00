"""The plugin's weight routing (vLLM's ``(name, tensor)`` stream -> our plan) and cache geometry, without vLLM.

The stream is replayed from the safetensors files in arbitrary order (vLLM reads shard by shard); every
layout must fill the modules bit-identically to ``load_model``, and every accounting failure must name the
tensor.
"""
from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from vllm_deepseek_v4.devtools.artifacts import make_checkpoint
from vllm_deepseek_v4.errors import AliasMismatchError, MissingTensorError
from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.loader.plan import build_plan
from vllm_deepseek_v4.model import build_model
from vllm_deepseek_v4.loader.load import schemes_from_plan
from vllm_deepseek_v4.vllm_plugin.weights import PlanRouter, assign, check_filled


def stream(path, *, shuffle: int | None = None, drop: str | None = None, extra=None):
    items = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            items += [(n, fh.get_tensor(n)) for n in fh.keys() if n != drop]
    if shuffle is not None:
        random.Random(shuffle).shuffle(items)
    return items + list(extra or [])


def fill(path, items, include_mtp=True):
    plan = build_plan(str(path), include_mtp=include_mtp)
    model = build_model(plan.cfg, schemes=schemes_from_plan(plan), dtype=torch.float32, device="meta")
    router = PlanRouter(plan, wanted=lambda key: True)
    modules = dict(model.named_modules())
    for key, t in router.route(items):
        assign(modules, key, t, torch.float32, plan.path)
    router.finish()
    check_filled(model, plan.path, "test")
    return model


@pytest.mark.parametrize("convention", ["upstream", "hf", "vllm", "nemo"])
def test_router_fills_like_load_model_in_any_order(tmp_path, convention):
    path = make_checkpoint(tmp_path, convention=convention)
    want, _ = load_model(str(path), dtype=torch.float32, progress=False)
    got = fill(path, stream(path, shuffle=1))
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_router_checks_aliases_whichever_comes_first(tmp_path):
    def dup(t):
        t["mtp.0.head.weight"] = t["head.weight"].float()
        t["mtp.0.emb.tok_emb.weight"] = t["embed.weight"].clone()
    path = make_checkpoint(tmp_path, edit=dup)
    for seed in range(3):
        fill(path, stream(path, shuffle=seed))

    def bad(t):
        t["mtp.0.head.weight"] = t["head.weight"].float() + 1
    path = make_checkpoint(tmp_path / "bad", edit=bad)
    with pytest.raises(AliasMismatchError, match="mtp.0.head.weight"):
        fill(path, stream(path, shuffle=0))


def test_router_names_the_missing_and_the_unknown_tensor(tmp_path):
    path = make_checkpoint(tmp_path)
    with pytest.raises(MissingTensorError, match="layers.1.attn.wq_a.weight"):
        fill(path, stream(path, drop="layers.1.attn.wq_a.weight"))
    with pytest.raises(MissingTensorError, match="surprise.weight"):
        fill(path, stream(path, extra=[("surprise.weight", torch.zeros(1))]))


def test_router_skips_the_other_models_share(tmp_path):
    path = make_checkpoint(tmp_path)
    plan = build_plan(str(path))
    router = PlanRouter(plan, wanted=lambda key: key.startswith(("mtp.", "embed.", "head.")))
    keys = [k for k, _ in router.route(stream(path))]
    router.finish()
    assert keys and all(k.startswith(("mtp.", "embed.", "head.")) for k in keys)
    assert "embed.weight" in keys and "head.weight" in keys
