"""Random weights for tests and tiny artifacts: every tensor gets a value of the right kind and scale.

Only float (bf16-scheme) linears are supported: quantised roles come from real checkpoints or from the
quant package's encoders, never from here.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .model import DSV4Model

__all__ = ["init_random_"]


@torch.no_grad()
def init_random_(model: DSV4Model, *, seed: int = 0) -> DSV4Model:
    """Fill ``model`` in place (deterministically for ``seed``) with weights that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg

    def randn(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, t in model.state_dict(keep_vars=True).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "tid2eid":                           # distinct experts per token
            picks = torch.rand(t.shape[0], cfg.n_routed_experts, generator=g).argsort(dim=-1)
            t.copy_(picks[:, : t.shape[1]])
        elif not t.is_floating_point() or t.element_size() == 1:
            raise ConfigError(f"init_random_: {name}", expected="a bf16-scheme model", found=str(t.dtype))
        elif name.endswith("norm.weight"):
            randn(t, 0.1, mean=1.0)
        elif leaf.endswith("_fn"):                      # hc mixers: mix logits of order 1 after the RMS
            randn(t, t.shape[1] ** -0.5)
        elif leaf.endswith("_base") or leaf in ("attn_sink", "ape", "bias"):
            randn(t, 0.5)
        elif leaf.endswith("_scale"):
            randn(t, 0.1, mean=1.0)
        elif name == "embed.weight":
            randn(t, 1.0)
        else:                                           # linear weights [out, in]
            randn(t, t.shape[-1] ** -0.5)
    return model
