"""Engine options the plugin cannot honour, refused when the model is constructed (where ``vllm_config`` is seen).

vLLM accepts many options that only its own model classes act on; on our target and draft they would be
silently ignored (an fp8 KV cache that stays fp32, overrides of a config the plugin reads from disk itself,
expert parallelism on modules that compute every expert). :data:`OPTIONS` is the table of such options: how
to read each from a ``VllmConfig``, which values are honoured, and why the others are refused.
:func:`check_options` raises one error naming every refused option, its value and what is supported.

Pipeline parallelism and ``--quantization`` are refused by ``model.check_supported`` (which calls this), data
parallelism by ``model.parallel_context`` (tensor/expert parallelism are honoured there);
the honoured options and the tests that show them are tabled in ``docs/vllm-plugin.md`` ("Engine options").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "OPTIONS", "refusals", "check_options", "HONOURED_LOAD_FORMATS"]

HONOURED_LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass(frozen=True)
class Option:
    """One engine option: ``read(vllm_config)`` -> its value; ``ok(value, vllm_config)`` -> honoured."""

    name: str                                   # the EngineArgs field / `vllm serve --flag`
    read: Callable[[Any], Any]
    ok: Callable[[Any, Any], bool]
    supported: str                              # the values that are honoured
    reason: str                                 # why the others are refused


def _spec(c: Any, field: str, default: Any = None) -> Any:
    spec = getattr(c, "speculative_config", None)
    return default if spec is None else getattr(spec, field, default)


def _dtype_name(c: Any) -> str:
    return str(c.model_config.dtype).removeprefix("torch.")


def _load_formats(c: Any) -> str:
    """``"auto"``, or ``"auto, draft: dummy"`` when the draft has its own load config."""
    draft = _spec(c, "draft_load_config")
    return str(c.load_config.load_format) + (f", draft: {draft.load_format}" if draft is not None else "")


OPTIONS: tuple[Option, ...] = (
    Option("dtype", _dtype_name, lambda v, c: v in ("float32", "bfloat16"), "float32, bfloat16",
           "float16 is untested with the plugin and DSv4 is trained and shipped in bf16 (its activations are not "
           "known to fit the float16 range)"),
    Option("kv_cache_dtype", lambda c: c.cache_config.cache_dtype, lambda v, c: v == "auto",
           "auto (the plugin's caches always hold float32 rows, vllm_plugin/kv.py)",
           "the plugin's KV caches store float32 rows whatever this says; no fp8/bf16/fp16 cache is implemented, "
           "so the option would be silently ignored"),
    Option("load_format", _load_formats,
           lambda v, c: all(f.removeprefix("draft: ") in HONOURED_LOAD_FORMATS for f in v.split(", ")),
           " | ".join(HONOURED_LOAD_FORMATS) + " (target and draft_load_config)",
           "the plugin plans its load from the safetensors headers and fills parameters through that plan "
           "(or materialises them for dummy); other loaders stream other files or vLLM's own parameter names"),
    Option("enable_eplb", lambda c: bool(c.parallel_config.enable_eplb), lambda v, c: not v, "False",
           "expert load balancing needs vLLM's expert-parallel MoE layers, which the plugin does not use"),
    Option("decode_context_parallel_size", lambda c: c.parallel_config.decode_context_parallel_size,
           lambda v, c: v == 1, "1", "the plugin's attention reads whole requests from one rank's cache"),
    Option("prefill_context_parallel_size", lambda c: c.parallel_config.prefill_context_parallel_size,
           lambda v, c: v == 1, "1", "the plugin's attention reads whole requests from one rank's cache"),
    Option("cpu_offload_gb", lambda c: c.offload_config.uva.cpu_offload_gb, lambda v, c: v == 0, "0",
           "vLLM offloads the parameters of its own layer helpers; the plugin's modules would keep every weight "
           "resident, ignoring the option"),
    Option("offload_group_size", lambda c: c.offload_config.prefetch.offload_group_size, lambda v, c: v == 0, "0",
           "vLLM offloads the parameters of its own layer helpers; the plugin's modules would keep every weight "
           "resident, ignoring the option"),
    Option("hf_overrides", lambda c: c.model_config.hf_overrides, lambda v, c: not v, "none",
           "the plugin builds the model from the artifact's own config.json (rope scaling, layer counts, ...), so "
           "overrides of vLLM's copy of the config would be ignored"),
    Option("runner", lambda c: c.model_config.runner_type, lambda v, c: v == "generate", "generate",
           "the plugin's classes are generative models only (no pooler)"),
    Option("attention_backend", lambda c: getattr(c.attention_config.backend, "name", None),
           lambda v, c: v is None, "not set",
           "every attention layer of the plugin uses its own torch backend (vllm_plugin/backend.py)"),
    Option("enable_lora", lambda c: c.lora_config is not None, lambda v, c: not v, "False",
           "the plugin's modules have no LoRA adapters"),
    Option("kv_transfer_config", lambda c: c.kv_transfer_config is not None, lambda v, c: not v, "not set",
           "KV connectors (disaggregated prefill, offloading) are untested with the plugin's cache layout"),
    Option("speculative_config.method", lambda c: _spec(c, "method"), lambda v, c: v in (None, "mtp", "ngram"),
           "mtp (the checkpoint's MTP block), ngram (no draft model), or none",
           "other methods load another draft model class or need target hidden states the plugin does not keep"),
    Option("speculative_config.quantization", lambda c: _spec(c, "quantization"),
           lambda v, c: v is None or v == _quant_name(), "not set",
           "the MTP draft computes in the formats its checkpoint tensors are stored in (detected per module)"),
    Option("speculative_config.draft_tensor_parallel_size", lambda c: _spec(c, "draft_tensor_parallel_size"),
           lambda v, c: v is None or v == c.parallel_config.tensor_parallel_size, "the target's tensor_parallel_size",
           "the draft runs on the target's ranks (it shares the target's embedding and head)"),
)


def _quant_name() -> str:
    from .quant import QUANT_NAME
    return QUANT_NAME


def refusals(vllm_config: Any) -> list[str]:
    """One message per option of :data:`OPTIONS` whose value the plugin cannot honour."""
    out = []
    for opt in OPTIONS:
        value = opt.read(vllm_config)
        if not opt.ok(value, vllm_config):
            flag = "--" + opt.name.split(".")[0].replace("_", "-")
            out.append(f"{opt.name}={value!r} ({flag}) is not supported (supported: {opt.supported}): {opt.reason}")
    return out


def check_options(vllm_config: Any) -> None:
    """Raise ``NotImplementedError`` naming every refused option (called by both model constructors)."""
    problems = refusals(vllm_config)
    if problems:
        raise NotImplementedError("DSv4 plugin: " + "; ".join(problems))
