"""What vLLM's GPU (``nvidia``) DeepSeek-V4 classes need on a CPU-only machine to *construct and load*.

No forward pass runs here: the point is vLLM's real parameter layout, real quant methods and real
``weight_loader`` / ``process_weights_after_loading`` code. Each stand-in is listed in :data:`STANDINS`
with the reason it is needed; :func:`cpu_standins` applies all of them and undoes them on exit.
Importing this module imports neither torch nor vLLM.
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

__all__ = ["STANDINS", "cpu_standins", "HF_OVERRIDES", "ensure_distributed"]

# (what, why) -- documentation and the report's record of what was replaced
STANDINS: tuple[tuple[str, str], ...] = (
    ("torch.cuda.Stream / torch.cuda.Event (and torch.xpu's) -> no-op objects",
     "the nvidia model, MTP predictor and attention create aux CUDA streams/events in their constructors"),
    ("current_platform.get_device_capability() -> (9, 0)",
     "the FlashMLA output-projection recipe asks for the device capability at construction"),
    ("block-FP8 linears: vLLM's pure-torch block kernel allowed on CPU",
     "vLLM's CPU block-FP8 kernels need AMX tiles (Sapphire Rapids); without them no kernel is found and the "
     "linear cannot be constructed; the torch kernel registers the same weight / weight_scale_inv parameters"),
    ("MXFP4 / int4 routed experts: vLLM's CPU MXFP4 and int4 experts allowed without AMX",
     "the DeepSeek-V4 MXFP4 backend oracle offers only the CPU experts on CPU, which refuse without AMX tiles; "
     "the parameters (w13/w2 weight + weight_scale, uint8) are the same"),
    ("NVFP4 / int4 emulation MoE experts and the NVFP4 emulation linear kernel allowed on CPU",
     "vLLM's kernel oracles find no CPU backend for NVFP4 or WNA16; the emulation classes only refuse "
     "because the platform is not CUDA, and they register the same parameters as the GPU kernels"),
)
# config.json of DeepSeek-V4 has no hidden_act; vLLM's shared-expert MLP reads it (and only accepts silu)
HF_OVERRIDES: dict[str, Any] = {"hidden_act": "silu"}


class _NoStream:
    """Accepts every call a CUDA stream or event receives during construction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoStream:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:        # wait_stream, record, synchronize, query, ...
        return lambda *a, **k: True


@contextlib.contextmanager
def cpu_standins() -> Iterator[None]:
    """Apply the :data:`STANDINS` (imports torch and vLLM) and restore everything on exit."""
    import torch
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    undo: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        undo.append((obj, name, obj.__dict__.get(name, _MISSING) if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    patch(torch.cuda, "Stream", _NoStream)
    patch(torch.cuda, "Event", _NoStream)
    if getattr(torch, "xpu", None) is not None:        # the xpu variant's attention swaps in torch.xpu.Event
        patch(torch.xpu, "Stream", _NoStream)
        patch(torch.xpu, "Event", _NoStream)
    patch(type(current_platform), "get_device_capability",
          classmethod(lambda cls, device_id=0: DeviceCapability(9, 0)))
    _allow_emulation(patch)
    _nvfp4_linear_emulation(patch)
    added = _allow_nvfp4_linear_emulation() + _allow_torch_block_fp8(patch)
    try:
        yield
    finally:
        for obj, name, old in reversed(undo):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        for lst, cls in added:
            with contextlib.suppress(ValueError):
                lst.remove(cls)


_MISSING = object()


def _allow_emulation(patch: Any) -> None:
    from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts
    from vllm.model_executor.layers.fused_moe.experts.nvfp4_emulation_moe import (
        Nvfp4QuantizationEmulationTritonExperts,
    )

    import torch
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4, CPUExpertsMxfp4

    classes: list[type] = [Nvfp4QuantizationEmulationTritonExperts, Int4EmulationTritonExperts]
    if not torch.cpu._is_amx_tile_supported():
        classes.append(CPUExpertsMxfp4)
        # int4: the CPU experts also refuse DeepSeek-V4 routing and group-32 keys; for construction and
        # loading only the method's parameters matter (CompressedTensorsWNA16MoEMethod creates them)
        patch(CPUExpertsInt4, "is_supported_config", staticmethod(lambda *a, **k: (True, None)))
    for cls in classes:
        patch(cls, "_supports_current_device", staticmethod(lambda: True))
    # weight-only NVFP4 (NVFP4A16: no activation scale on disk) has no CPU experts either; the emulation
    # experts take the same w13/w2 weight_packed / weight_scale / weight_global_scale parameters
    from vllm.model_executor.layers.quantization.utils.quant_utils import kNvfp4Static

    orig = Nvfp4QuantizationEmulationTritonExperts._supports_quant_scheme
    patch(Nvfp4QuantizationEmulationTritonExperts, "_supports_quant_scheme",
          staticmethod(lambda w, a: orig(w, a) or (w == kNvfp4Static and a is None)))


def _allow_nvfp4_linear_emulation() -> list[tuple[list, type]]:
    from vllm.model_executor.kernels import linear as kl
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    table = kl._POSSIBLE_NVFP4_KERNELS
    lst = table.setdefault(PlatformEnum.CPU, [])
    if EmulationNvFp4LinearKernel in lst:
        return []
    lst.append(EmulationNvFp4LinearKernel)
    return [(lst, EmulationNvFp4LinearKernel)]


def _allow_torch_block_fp8(patch: Any) -> list[tuple[list, type]]:
    import torch
    from vllm.model_executor.kernels import linear as kl
    from vllm.model_executor.kernels.linear.scaled_mm.pytorch import BlockWiseTorchFP8ScaledMMLinearKernel
    from vllm.platforms import PlatformEnum

    if torch.cpu._is_amx_tile_supported():           # vLLM's own CPU kernels work here
        return []
    patch(BlockWiseTorchFP8ScaledMMLinearKernel, "is_supported",
          classmethod(lambda cls, compute_capability=None: (True, None)))
    lst = kl._POSSIBLE_FP8_BLOCK_KERNELS.setdefault(PlatformEnum.CPU, [])
    lst.insert(0, BlockWiseTorchFP8ScaledMMLinearKernel)
    return [(lst, BlockWiseTorchFP8ScaledMMLinearKernel)]


def _nvfp4_linear_emulation(patch: Any) -> None:
    """compressed-tensors NVFP4 linears pick their kernel by name at construction; on CPU only the emulation
    kernel exists (and W4A16-NVFP4 filters it out), so the scheme gets the emulation kernel."""
    from vllm.model_executor.kernels.linear import NvFp4LinearLayerConfig
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_w4a4_nvfp4 as m

    patch(m, "init_nvfp4_linear_kernel", lambda use_a16=False: EmulationNvFp4LinearKernel(NvFp4LinearLayerConfig()))


def ensure_distributed(vllm_config: Any) -> None:
    """A one-process gloo group and model-parallel state (TP = PP = 1), created once per process."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return
    with set_current_vllm_config(vllm_config):
        if ps._WORLD is None:
            ps.init_distributed_environment(1, 0, f"tcp://127.0.0.1:{_free_port()}", 0, "gloo")
        ps.initialize_model_parallel(1, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
