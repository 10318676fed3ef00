"""``load_format="dummy"`` (vLLM's DummyModelLoader, used by ``vllm bench`` and vLLM's own DSv4 tests).

Our target and draft are built on the meta device and only leave it in ``load_weights``. vLLM's dummy loader
never calls ``load_weights``: after construction it walks ``model.modules()`` and fills every parameter and
persistent buffer with ``initialize_single_dummy_weight`` (``vllm/model_executor/model_loader/dummy_loader.py``),
which skips meta tensors, fills ``tensor.dummy_weight_value`` where a tensor carries one, leaves integer tensors
as they are, and fills every other float tensor with ``uniform(-1e-3, 1e-3)`` from a generator seeded 1234.

So when the dummy loader will run, :func:`materialize_if_dummy` (a hook at the end of each constructor) does the
real load's assignment without a file: every canonical key the model's :class:`~.weights.PlanRouter` wants gets
an empty tensor of the on-disk dtype and the planned shape (the plan's slicing ops applied), put in place by the
same ``assign`` as a real load (quantised roles keep their storage dtypes, ModelOpt's global is registered the
way the checkpoint has it), and is then filled:

- float values (bf16/fp32 weights, norms, hyper-connection and sink tensors, fp8 e4m3 codes): vLLM's own
  ``initialize_single_dummy_weight`` (the loader writes the same values again; e4m3 cannot hold most of
  +-1e-3, so fp8 codes are mostly zero, as in vLLM's own dummy FP8 runs);
- scales and globals: a positive power of two (:data:`SCALE_VALUE`), so nothing dequantises to NaN/inf: the
  uniform fill would make them negative, zero, or NaN bytes in e8m0. Float ones carry ``dummy_weight_value``
  (the loader refills the same constant), e8m0 bytes in ``uint8`` are encoded. The values put every dequantised
  weight at the scale of vLLM's fill (fp4 codes <= 6 times ``2^-12``: about 1.5e-3);
- integer codes (packed fp4 bytes, int4 words, zero points): seeded random bits -- every bit pattern is a valid
  code. ``weight_shape`` is the logical ``[out, in]``; the hash-routing table ``tid2eid`` holds ``k`` distinct
  experts in ``[0, n_routed_experts)`` per token.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..checkpoint.format import TORCH_DTYPE_NAMES
from ..loader.stream import apply_ops
from ..model.linear import QLinear
from ..model.moe import Gate
from ..quant import SCHEMES
from ..quant.e8m0 import exponent_to_e8m0
from ..quant.scheme import CODES, GLOBAL, SCALES, SHAPE, ZEROS
from .weights import PlanRouter, assign, check_filled

__all__ = ["SCALE_VALUE", "SEED", "dummy_requested", "materialize_if_dummy", "dummy_fill"]

logger = logging.getLogger(__name__)

SEED = 1234     # vLLM's initialize_single_dummy_weight seed, reused for the integer fills
# (scheme, role) -> the decoded value of every scale / global. fp8_block: 1, the e4m3 codes hold vLLM's fill
# directly; fp4 / int4 codes reach 6 / 8, so their scale is 2^-12; nvfp4: local e4m3 1 (2^-12 is below e4m3's
# range) and the global divides by 4096 (compressed-tensors) or multiplies by 2^-12 (ModelOpt).
SCALE_VALUE: dict[tuple[str, str], float] = {
    ("fp8_block", "scale"): 1.0, ("mxfp4", "scale"): 2.0 ** -12, ("w4a16", "weight_scale"): 2.0 ** -12,
    ("nvfp4", "weight_scale"): 1.0, ("nvfp4", "weight_global_scale"): 4096.0, ("nvfp4", "weight_scale_2"): 2.0 ** -12,
    ("nvfp4", "input_global_scale"): 1.0, ("nvfp4", "input_scale"): 1.0,
}


def dummy_requested(vllm_config: object, *, draft: bool = False) -> bool:
    """Will vLLM load this model with its dummy loader? (The draft may have its own ``draft_load_config``.)"""
    load_config = vllm_config.load_config  # type: ignore[attr-defined]
    spec = getattr(vllm_config, "speculative_config", None)
    if draft and getattr(spec, "draft_load_config", None) is not None:
        load_config = spec.draft_load_config  # type: ignore[union-attr]
    return str(getattr(load_config, "load_format", "")) == "dummy"


def materialize_if_dummy(vllm_config: object, root: nn.Module, modules: dict[str, nn.Module], router: PlanRouter,
                         dtype: torch.dtype, what: str, *, draft: bool = False) -> bool:
    """Under ``load_format="dummy"``: put an empty tensor at every key ``router`` wants (the real load's
    ``assign``), fill them (:func:`dummy_fill`) and check nothing is left on meta. Returns whether it did."""
    if not dummy_requested(vllm_config, draft=draft):
        return False
    path = router.plan.path
    for name, targets in router.targets.items():
        info = router.plan.checkpoint.tensors[name]
        on_disk = torch.empty(info.shape, dtype=getattr(torch, TORCH_DTYPE_NAMES[info.dtype]), device="meta")
        for tgt in targets:
            if not tgt.alias:                      # copies of the shared embed/head: nothing to compare here
                assign(modules, tgt.key, torch.empty(apply_ops(on_disk, tgt.ops).shape, dtype=on_disk.dtype),
                       dtype, path)
    check_filled(root, path, what)
    dummy_fill(root)
    logger.info("DSv4 plugin: %s materialised for load_format=dummy (%s)", what, path)
    return True


@torch.no_grad()
def dummy_fill(root: nn.Module) -> None:
    """Fill every parameter / persistent buffer below ``root`` as described in the module docstring."""
    from vllm.model_executor.model_loader.weight_utils import initialize_single_dummy_weight

    gen = torch.Generator().manual_seed(SEED)        # CPU: the same bits on every device (copied into place)
    for module in root.modules():
        tensors = {**module._parameters, **{n: b for n, b in module._buffers.items()
                                            if n not in module._non_persistent_buffers_set}}
        for role, t in tensors.items():
            if t is None:
                continue
            kind = _quant_kind(module, role)
            if kind in (SCALES, GLOBAL):
                value = SCALE_VALUE[(module.scheme, role)]  # type: ignore[union-attr]
                if t.is_floating_point():
                    t.dummy_weight_value = value           # the dummy loader refills this constant
                    initialize_single_dummy_weight(t)
                else:                                      # e8m0 biased exponents stored as uint8
                    t.copy_(exponent_to_e8m0(torch.full(t.shape, int(math.log2(value)), device="cpu"), dtype=t.dtype))
            elif kind == SHAPE:
                t.copy_(torch.tensor([module.out_features, module.in_features]))  # type: ignore[union-attr]
            elif isinstance(module, Gate) and role == "tid2eid":
                E = module.out_features
                first = torch.randint(0, E, (t.shape[0], 1), generator=gen, device="cpu")
                t.copy_((first + torch.arange(t.shape[1], device="cpu")) % E)
            elif t.is_floating_point():
                initialize_single_dummy_weight(t)
            elif kind in (CODES, ZEROS):
                bits = torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=gen,
                                     device="cpu")
                t.view(-1).view(torch.uint8).copy_(bits)
            else:
                raise TypeError(f"DSv4 plugin: no dummy fill for {type(module).__name__}.{role} ({t.dtype})")


def _quant_kind(module: nn.Module, role: str) -> str | None:
    """The scheme role kind of ``role`` on a quantised ``QLinear`` (None for plain tensors and bf16 weights)."""
    if not isinstance(module, QLinear) or module.scheme == "bf16" or not SCHEMES[module.scheme].has(role):
        return None
    return SCHEMES[module.scheme].role(role).kind
