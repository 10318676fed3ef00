"""Tensor and expert parallel in one process: every rank's sharded model runs in its own thread with collectives
that sum / concatenate the ranks' tensors in rank order, loaded through the plugin's ``PlanRouter`` (only the
rank's slices of each on-disk tensor); the result must equal the unsharded model in fp32 (greedy tokens,
logits to float tolerance: only the order of the all-reduce sums differs) -- main stack and MTP draft.

- the shipped tiny model and the tests' tiny model (4 heads, 2 output groups, 2 index heads): TP 2, TP 2 + EP;
- zoo layouts written from a TP-friendly config (``TP_OVERRIDES``: every split keeps whole 128-blocks up to
  TP 4): TP 2 and 4, with and without EP;
- refusals at construction: an FP8 split inside a 128-row block, a TP size that splits the output groups.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import vllm_support as vs
from tiny import make_config, make_model
from vllm_deepseek_v4.devtools import zoo as build_zoo
from vllm_deepseek_v4.errors import ConfigError, TensorShapeError, UnmappedTensorError
from vllm_deepseek_v4.loader.load import check_filled, schemes_from_plan
from vllm_deepseek_v4.loader.plan import build_plan
from vllm_deepseek_v4.loader.sharding import EXPERT, REPLICATED, shard_rule
from vllm_deepseek_v4.model import DSV4Model, QLinear
from vllm_deepseek_v4.model.moe import MoE
from vllm_deepseek_v4.quant import SCHEMES
from vllm_deepseek_v4.model.parallel import Parallel
from vllm_deepseek_v4.vllm_plugin.weights import PlanRouter, assign

# Heads 8 in 4 output groups of o_lora 128, 4 index heads of 128, I = 512: at TP 2 and 4 every split of an
# FP8 (128 x 128), MXFP4 / W4A16 (32) or NVFP4 (16) weight keeps whole blocks, so every zoo layout shards.
TP_OVERRIDES: dict[str, Any] = dict(num_attention_heads=8, o_groups=4, o_lora_rank=128, index_n_heads=4,
                                    index_head_dim=128, moe_intermediate_size=512)
PROMPT, N = vs.PROMPTS[0], 24          # 17 prompt tokens + 24 decoded: windows of 8, ratios 4 and 8


class ThreadGroup:
    """Collectives for ``size`` ranks running in threads: each rank posts its tensor, all wait, all combine
    the posted tensors in rank order (so every rank gets the same bits)."""

    def __init__(self, size: int) -> None:
        self.size, self.slots = size, [torch.empty(0)] * size
        self.barrier = threading.Barrier(size, timeout=120)

    def _combine(self, rank: int, t: torch.Tensor, how: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        self.slots[rank] = t
        self.barrier.wait()
        out = how(list(self.slots))
        self.barrier.wait()
        return out

    def context(self, rank: int, ep: bool = False) -> Parallel:
        return Parallel(tp_rank=rank, tp_size=self.size, ep_rank=rank if ep else 0, ep_size=self.size if ep else 1,
                        all_reduce=lambda t: self._combine(rank, t, lambda ts: reduce(torch.add, ts)),
                        all_gather=lambda t: self._combine(rank, t, lambda ts: torch.cat(ts, dim=-1)))


def stream(path: Path | str):
    """``(on-disk name, tensor)`` of every shard, memory-mapped like vLLM's safetensors iterator."""
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def load_rank(path: Path | str, parallel: Parallel, dtype: torch.dtype = torch.float32) -> DSV4Model:
    """One rank's model: built with its local shapes on meta, filled through ``PlanRouter`` with its slices."""
    plan = build_plan(str(path))
    plan.raise_if_bad()
    with torch.device("meta"):
        model = DSV4Model(plan.cfg, schemes=schemes_from_plan(plan), dtype=dtype, parallel=parallel)
    router = PlanRouter(plan, wanted=lambda key: True, parallel=parallel)
    modules = model.canonical_modules()
    for key, t in router.route(stream(path)):
        assign(modules, key, t, dtype, plan.path)
    router.finish()
    check_filled(model, plan.path, f"rank {parallel.tp_rank}")
    return model.eval()


@torch.no_grad()
def decode(model: DSV4Model, prompt: list[int], n: int) -> dict[str, Any]:
    """Greedy tokens, the prefill logits and the MTP draft's logits over the prefill's streams."""
    state = model.new_state()
    logits, hidden = model(torch.tensor([prompt]), state)
    draft, _ = model.forward_mtp(hidden[:, :-1], torch.tensor([prompt[1:]]), model.new_mtp_state())
    first, tokens = logits, []
    for _ in range(n):
        tokens.append(int(logits[0, -1].argmax()))
        logits, _ = model(torch.tensor([[tokens[-1]]]), state)
    return {"tokens": tokens, "logits": first, "draft": draft, "draft_top": draft[0].argmax(-1).tolist()}


def run_ranks(path: Path | str, tp: int, ep: bool = False) -> tuple[list[dict[str, Any]], list[int]]:
    """Load and decode every rank in its own thread; returns each rank's result and parameter bytes."""
    group = ThreadGroup(tp)
    results: list[Any] = [None] * tp

    def rank(r: int) -> None:
        try:
            model = load_rank(path, group.context(r, ep))
            results[r] = (decode(model, PROMPT, N), param_bytes(model, ep))
        except BaseException as e:          # reported below; the barrier's timeout frees the other ranks
            results[r] = e
            group.barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        if isinstance(res, BaseException) and not isinstance(res, threading.BrokenBarrierError):
            raise res
    return [res[0] for res in results], [res[1] for res in results]


def param_bytes(model: torch.nn.Module, ep: bool = False) -> dict[str, int]:
    """Parameter + buffer bytes: what every rank holds whole (SHARD_RULES' replicated rows, and the roles of
    TP-split linears that are not tiled by the weight -- global scales, w4a16 ``weight_shape`` -- which
    ``rank_reads`` reads whole) and what is split (under EP: every routed expert tensor)."""
    out = {"whole": 0, "split": 0}
    modules = dict(model.named_modules())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        owner, _, role = name.rpartition(".")
        lin = modules.get(owner)
        kind = rule_of(name).kind
        untiled = isinstance(lin, QLinear) and SCHEMES[lin.scheme].has(role) and SCHEMES[lin.scheme].block(role) is None
        whole = kind == REPLICATED or (untiled and not (ep and kind == EXPERT))
        out["whole" if whole else "split"] += t.nbytes
    return out


def rule_of(name: str):
    """The SHARD_RULES row of a model parameter: by its own name, or its linear module's (``.weight`` roles)."""
    try:
        return shard_rule(name)
    except UnmappedTensorError:
        return shard_rule(name.rsplit(".", 1)[0])


def assert_matches(ranks: list[dict[str, Any]], want: dict[str, Any]) -> None:
    for r, got in enumerate(ranks):
        assert got["tokens"] == want["tokens"], f"rank {r}"
        assert got["draft_top"] == want["draft_top"], f"rank {r}"
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["draft"], want["draft"], rtol=1e-5, atol=1e-5)


def assert_bytes_bound(per_rank: list[dict[str, int]] | list[int], full: dict[str, int], tp: int) -> None:
    """Each rank holds exactly 1/tp of the unsharded split bytes plus the whole (replicated) part: per part where
    the rank's bytes come as ``param_bytes``' ``{"whole", "split"}`` (the ranks here), as the sum where only the
    total is measured (vLLM's workers: ``vllm_plugin.model.rank_report``)."""
    assert full["split"] % tp == 0, f"{full['split']} split bytes do not divide over {tp} ranks"
    share = {"whole": full["whole"], "split": full["split"] // tp}
    for r, got in enumerate(per_rank):
        want = share if isinstance(got, dict) else share["whole"] + share["split"]
        assert got == want, f"rank {r}: {got} bytes, expected {want} (unsharded: {full}, tp={tp})"


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    path = vs.write_model(tmp_path_factory.mktemp("tp_tiny"), vs.seeded_model(1, agree=0.15))
    return (path, *reference(path))


def reference(path: Path | str) -> tuple[dict[str, Any], DSV4Model]:
    """The unsharded model's ``decode`` result, and the model."""
    ref = vs.reference_model(path)
    return decode(ref, PROMPT, N), ref


def tp_friendly_model() -> DSV4Model:
    """A seeded model of the ``TP_OVERRIDES`` config whose MTP is a good-but-imperfect draft."""
    return vs.agreeable(make_model(make_config(**TP_OVERRIDES), seed=1), eps=0.15)


@pytest.mark.parametrize("ep", [False, True])
def test_tiny_model_tp2_equals_unsharded(tiny_artifact, ep):
    path, want, ref = tiny_artifact
    ranks, sizes = run_ranks(path, 2, ep)
    assert_matches(ranks, want)
    assert_bytes_bound(sizes, param_bytes(ref, ep), 2)


@pytest.mark.parametrize("ep", [False, True])
def test_each_rank_holds_its_experts_whole_under_ep_and_a_slice_of_every_expert_under_tp(tiny_artifact, ep):
    """The bytes bound cannot tell EP from TP (E/2 whole experts weigh what E half-width experts weigh): check
    which experts a rank holds and that they are the checkpoint's, trunk and MTP."""
    path, _, ref = tiny_artifact
    n_exp, inter = ref.cfg.n_routed_experts, ref.cfg.moe_inter_dim
    moes = {name: m for name, m in ref.named_modules() if isinstance(m, MoE)}
    assert any(name.startswith("mtp") for name in moes), sorted(moes)
    for r in range(2):
        model = load_rank(path, Parallel(tp_rank=r, tp_size=2, ep_rank=r if ep else 0, ep_size=2 if ep else 1))
        for name, want in moes.items():
            got = model.get_submodule(name)
            ids = range(r * n_exp // 2, (r + 1) * n_exp // 2) if ep else range(n_exp)
            rows = slice(None) if ep else slice(r * inter // 2, (r + 1) * inter // 2)
            assert got.expert_ids == ids and len(got.experts) == len(ids), (name, r)
            for j, e in zip(ids, got.experts):
                assert torch.equal(e.w1.weight, want.experts[j].w1.weight[rows]), (name, r, j)
                assert torch.equal(e.w2.weight, want.experts[j].w2.weight[:, rows]), (name, r, j)


def test_shipped_tiny_model_tp2_ep_equals_unsharded():
    from vllm_deepseek_v4.assets import tiny_model_path

    path = tiny_model_path()
    ref = vs.reference_model(path)
    ranks, sizes = run_ranks(path, 2, ep=True)
    assert_matches(ranks, decode(ref, PROMPT, N))
    assert_bytes_bound(sizes, param_bytes(ref, True), 2)


@pytest.fixture(scope="module")
def tp_zoo(tmp_path_factory):
    """Zoo layouts written from ``tp_friendly_model``; made on demand with their reference."""
    return vs.zoo_layouts(tmp_path_factory, tp_friendly_model(), reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout, tp, ep", [
    ("upstream_fp8_mxfp4", 4, True), ("nvfp4_trunk_nvfp4_mtp", 2, True),
    ("modelopt_mixed", 4, False), ("w4a16_trunk", 2, False), ("vllm_internal", 2, True),
    ("head_embed_duplicated", 2, False)])
def test_zoo_layout_sharded_equals_unsharded(tp_zoo, layout, tp, ep):
    path, want, ref = tp_zoo(layout)
    ranks, sizes = run_ranks(path, tp, ep)
    assert_matches(ranks, want)
    assert_bytes_bound(sizes, param_bytes(ref, ep), tp)


def test_fp8_split_inside_a_block_is_refused_naming_the_tensor(tp_zoo, tmp_path):
    """The tests' tiny config: wo_a has 2 groups x 32 rows, one 128-row FP8 block that TP 2 would cut."""
    src = vs.write_model(tmp_path / "src", vs.seeded_model(0))
    floats, raw_cfg, cfg = build_zoo.read_source(str(src))
    build_zoo.write_layout(tmp_path / "fp8", "upstream_fp8_mxfp4", floats, raw_cfg, cfg)
    plan = build_plan(str(tmp_path / "fp8"))
    with pytest.raises(TensorShapeError, match=r"aligned to the 128-element blocks"):
        PlanRouter(plan, wanted=lambda key: True, parallel=Parallel(tp_rank=0, tp_size=2))


def test_tp_that_splits_output_groups_is_refused_at_construction():
    with pytest.raises(ConfigError, match=r"o_groups.*multiple of tp_size=4"):
        DSV4Model(make_config(), parallel=Parallel(tp_rank=0, tp_size=4))
