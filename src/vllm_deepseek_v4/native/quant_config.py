"""vLLM quant configs built from the schemes found on disk, one per model class (target, MTP draft).

vLLM builds its DeepSeek-V4 MTP draft with the *target's* ``quant_config`` object, so a BF16 draft in an FP8
checkpoint gets ``Fp8LinearMethod`` and a compressed-tensors config whose targets are written in checkpoint
names (``mtp.0.e_proj``) never matches vLLM's runtime prefixes (``model.layers.{L}.e_proj``). Here each class
gets its own config, decided from the plan's per-module schemes (never from ``quantization_config``), with
every target and ignore entry written as the exact runtime module name vLLM will ask about:

==========================================  ===================================================================
modules on disk (one part)                  vLLM config
==========================================  ===================================================================
all BF16                                    none (unquantized methods everywhere)
DeepSeek FP8 block (+ MXFP4 / FP8 /         ``DeepseekV4FP8Config`` with this part's own expert dtype, scale
ModelOpt NVFP4 experts)                     encoding and NVFP4 switch; BF16 modules listed in ``ignored_layers``
compressed-tensors (NVFP4, W4A16, FP8)      ``CompressedTensorsConfig``: one group per scheme, exact targets,
                                            every other linear in ``ignore``
==========================================  ===================================================================

Importing this module imports neither torch nor vLLM; :func:`make_quant_config` does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModuleScheme", "QuantChoice", "choose_family", "make_quant_config", "extra_ignored", "CT_WEIGHTS"]


@dataclass(frozen=True)
class ModuleScheme:
    """The scheme of one vLLM module (all its shards / experts agree), with what the config needs to know."""

    scheme: str                      # bf16 | fp8_block | mxfp4 | nvfp4 | w4a16
    variant: str = ""                # deepseek | hf-fp8 | compressed-tensors | modelopt
    scale_dtype: str = ""            # fp8_block: F8_E8M0 | F32 | BF16 ...
    group: int | None = None         # w4a16 group size (read off weight_scale's shape)
    input_scale: bool = False        # nvfp4: a static input (global) scale is on disk (W4A4)
    zero_point: bool = False         # w4a16: asymmetric


@dataclass
class QuantChoice:
    """The family chosen for one model class and the facts its config is built from."""

    family: str                                  # unquantized | deepseek_fp8 | compressed_tensors
    modules: dict[str, ModuleScheme]             # vLLM module -> scheme (experts: the FusedMoE module)
    experts: str = "bf16"                        # the routed experts' scheme (one for the whole class)
    scale_e8m0: bool = True
    problems: list[str] = field(default_factory=list)


# compressed-tensors ``weights`` / ``input_activations`` / ``format`` for each scheme we write a group for
CT_WEIGHTS: dict[str, dict[str, Any]] = {
    "fp8_block": {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                              "block_structure": [128, 128], "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                        "group_size": 128, "dynamic": True},
                  "format": "float-quantized"},
    "nvfp4": {"weights": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                          "group_size": 16, "dynamic": False},
              "input_activations": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                                    "group_size": 16, "dynamic": "local"},
              "format": "nvfp4-pack-quantized"},
    "w4a16": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                          "dynamic": False},
              "input_activations": None, "format": "pack-quantized"},
}
_DEEPSEEK_VARIANTS = frozenset({"deepseek", "hf-fp8"})
# vLLM's fused modules -> the shard names its configs match ignore/target entries against
PACKED = {"fused_wqa_wkv": ("wq_a", "wkv"), "fused_wkv_wgate": ("wkv", "wgate"), "gate_up_proj": ("w1", "w3")}


def is_experts(module: str) -> bool:
    return module.endswith(".ffn.experts") or module.endswith(".ffn")


def choose_family(modules: dict[str, ModuleScheme]) -> QuantChoice:
    """Decide the vLLM config family for one model class from its modules' schemes."""
    quantized = {m: s for m, s in modules.items() if s.scheme != "bf16"}
    exp_schemes = {s.scheme for m, s in modules.items() if is_experts(m)}
    choice = QuantChoice("unquantized", dict(modules), next(iter(exp_schemes)) if len(exp_schemes) == 1 else "bf16")
    if len(exp_schemes) > 1:
        choice.problems.append(f"routed experts are {' and '.join(sorted(exp_schemes))} in different layers; vLLM "
                               "chooses one expert method per model")
    if not quantized:
        return choice
    ct = {m for m, s in quantized.items() if s.variant == "compressed-tensors" or s.scheme == "w4a16"}
    native = {m for m, s in quantized.items() if m not in ct}
    if ct and native:
        choice.problems.append(f"compressed-tensors modules ({sorted(ct)[0]}, ...) and DeepSeek-native ones "
                               f"({sorted(native)[0]}, ...) in one model: vLLM takes one config per model")
    if ct:
        choice.family = "compressed_tensors"
        return choice
    choice.family = "deepseek_fp8"
    for m, s in quantized.items():
        if is_experts(m):
            if not (s.scheme in ("mxfp4", "fp8_block") or (s.scheme == "nvfp4" and s.variant == "modelopt")):
                choice.problems.append(f"{m}: {s.scheme} ({s.variant}) experts have no DeepseekV4FP8Config method")
        elif s.scheme != "fp8_block":
            choice.problems.append(f"{m}: {s.scheme} ({s.variant}) is not a block-FP8 linear; DeepseekV4FP8Config "
                                   "quantizes linears as block FP8 only")
    fp8_scales = {s.scale_dtype for s in quantized.values() if s.scheme == "fp8_block"}
    if len(fp8_scales) > 1 and "F8_E8M0" in fp8_scales:
        choice.problems.append(f"block-FP8 scales are both e8m0 and float ({sorted(fp8_scales)}); vLLM keeps one "
                               "scale dtype per model")
    choice.scale_e8m0 = "F8_E8M0" in fp8_scales or not fp8_scales
    return choice


def runtime_name(module: str) -> str:
    """The prefix vLLM constructs ``module`` with. An MTP layer's decoder block is built with the layer's own
    prefix, so ``model.layers.{M}.mtp_block.attn.wq_b`` (parameter path) is ``model.layers.{M}.attn.wq_b``
    when a quant config is asked about it."""
    return module.replace(".mtp_block.", ".")


def shard_names(module: str) -> list[str]:
    """The names vLLM's configs match for ``module`` (runtime prefix): a fused module's shards *and* its own
    name (the draft class declares no ``packed_modules_mapping``, so its fused modules are asked about by
    their own name), else the module itself."""
    name = runtime_name(module)
    head, _, leaf = name.rpartition(".")
    if leaf in PACKED:
        return [f"{head}.{s}" for s in PACKED[leaf]] + [name]
    return [name]


def _experts_regex(module: str) -> str:
    """compressed-tensors asks about ``<FusedMoE prefix>.0.w1`` etc.; the prefix may carry ``routed_experts``."""
    return "re:^" + re.escape(runtime_name(module)) + r"(\.routed_experts)?\.\d+\.(w1|w2|w3)$"


def make_quant_config(choice: QuantChoice, *, extra_ignored: list[str] = ()) -> Any:
    """The vLLM config object for ``choice`` (None for unquantized). Imports vLLM."""
    if choice.family == "unquantized":
        return None
    bf16 = [m for m, s in choice.modules.items() if s.scheme == "bf16"] + list(extra_ignored)
    if choice.family == "deepseek_fp8":
        ignored = [n for m in bf16 for n in ([runtime_name(m)] if is_experts(m) else shard_names(m))]
        cls = _deepseek_config_class()
        expert_dtype = {"fp8_block": "fp8"}.get(choice.experts, "fp4")
        return cls(expert_dtype=expert_dtype, moe_quant_algo="NVFP4" if choice.experts == "nvfp4" else "",
                   scale_e8m0=choice.scale_e8m0, is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                   ignored_layers=ignored, weight_block_size=[128, 128])
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    groups: dict[tuple, list[str]] = {}
    for m, s in sorted(choice.modules.items()):
        if s.scheme == "bf16":
            continue
        key = (s.scheme, s.group, s.input_scale, s.zero_point)
        groups.setdefault(key, []).extend([_experts_regex(m)] if is_experts(m) else shard_names(m))
    config_groups = {}
    for i, ((scheme, group, input_scale, zero_point), targets) in enumerate(groups.items()):
        spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in CT_WEIGHTS[scheme].items()}
        if scheme == "w4a16":
            spec["weights"]["group_size"] = group or 32
            spec["weights"]["symmetric"] = not zero_point
        if scheme == "nvfp4" and not input_scale:
            spec["input_activations"] = None            # NVFP4A16: no activation scale on disk
        config_groups[f"group_{i}"] = {"targets": targets, **spec}
    ignore = [n for m in bf16 for n in ([_experts_regex(m)] if is_experts(m) else shard_names(m))]
    cfg = {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
           "config_groups": config_groups, "ignore": ignore}
    return CompressedTensorsConfig.from_config(cfg)


_CLASS: list[type] = []


def _deepseek_config_class() -> type:
    """``DeepseekV4FP8Config`` with this model class's own expert dtype, NVFP4 switch and scale encoding.

    vLLM resolves all three from the *target's* ``hf_config`` (one answer per model); the draft's modules can
    differ (a ModelOpt NVFP4 trunk keeps MXFP4 MTP experts), so the subclass takes them as arguments.
    """
    if _CLASS:
        return _CLASS[0]
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    class DetectedDeepseekV4FP8Config(DeepseekV4FP8Config):
        def __init__(self, *args: Any, expert_dtype: str = "fp4", moe_quant_algo: str = "",
                     scale_e8m0: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._resolved_expert_dtype = expert_dtype
            self._resolved_moe_quant_algo = moe_quant_algo
            self._scale_e8m0 = scale_e8m0

        @property
        def is_scale_e8m0(self) -> bool:     # type: ignore[override]
            return self._scale_e8m0

    DetectedDeepseekV4FP8Config.__qualname__ = DetectedDeepseekV4FP8Config.__name__
    _CLASS.append(DetectedDeepseekV4FP8Config)
    return DetectedDeepseekV4FP8Config


def extra_ignored(kind: str, plan: Any) -> list[str]:
    """Embedding / LM-head modules of ``kind`` ("target" or "mtp"), never quantized here, so a
    compressed-tensors config ignores them."""
    if kind == "target":
        return ["model.embed_tokens", "lm_head"]
    L = plan.cfg.n_layers
    return ["model.embed_tokens"] + [f"model.layers.{L + k}.shared_head.head" for k in range(plan.cfg.n_mtp_layers)]
