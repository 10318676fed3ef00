"""Quantization formats: what is on disk, how to detect it, how to decode it.

A *scheme* is decided per module from the tensors on disk (``detect.py``). Each scheme stores a module's
weight as a small set of *roles*; the loader renames on-disk suffixes to these canonical roles, so the model
and the kernels never see producer-specific names (``docs/checkpoint-formats.md §6-7``). Everything known about
a format -- roles, dtypes, block sizes, packing, scale encoding -- is its :class:`Scheme` record in
``scheme.py`` (``SCHEMES[name]``); which scheme-table entry a module reads is ``groups.py``:

=========  =======================================================================================
scheme     canonical roles (dtype, shape for a logical ``[out, in]`` weight)
=========  =======================================================================================
bf16       ``weight`` (any float) ``[out, in]``
fp8_block  ``weight`` F8_E4M3 ``[out, in]``; ``scale`` (F8_E8M0 | F32 | BF16 | F16) ``[ceil(out/128), ceil(in/128)]``
           (on disk ``.scale``, ``.weight_scale_inv`` or compressed-tensors ``.weight_scale``; a multiplier)
mxfp4      ``weight`` I8|U8 ``[out, in/2]`` (e2m1, low nibble first); ``scale`` F8_E8M0|U8 ``[out, in/32]``
nvfp4      ``weight`` U8 ``[out, in/2]``; ``weight_scale`` F8_E4M3 ``[out, in/16]``; and either
           ``weight_global_scale`` F32 (compressed-tensors: divide) or ``weight_scale_2`` F32 (ModelOpt:
           multiply); optional ``input_global_scale`` / ``input_scale``
w4a16      ``weight_packed`` I32 ``[out, ceil(in/8)]``; ``weight_scale`` float ``[out, in/group]``;
           ``weight_shape`` I64 ``[2]``; optional ``weight_zero_point``
=========  =======================================================================================

Only the standard library is imported here (planning never imports torch).
"""
from __future__ import annotations

from .groups import GROUP_OF, GROUPS, group_of, scheme_of
from .scheme import SCHEMES, Role, Scheme, cdiv

__all__ = ["SCHEMES", "Scheme", "Role", "cdiv", "GROUPS", "GROUP_OF", "group_of", "scheme_of"]
