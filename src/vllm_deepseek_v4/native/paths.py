"""Where a vLLM model's files are on disk: the one place both engines (and the upstream branch) find the
directory whose safetensors headers the load plan reads.

vLLM accepts a local directory or a hub id; for a hub id its loader downloads ``*.safetensors`` into the
Hugging Face cache (``snapshot_download``; only the cache under ``HF_HUB_OFFLINE=1``; ModelScope under
``VLLM_USE_MODELSCOPE``). The plan needs the headers before vLLM's loader runs (the draft's quant config is
decided at construction), so a hub id is resolved the same way here, into the same cache snapshot vLLM then
reuses. A model that cannot be resolved is refused (:class:`ModelPathError`): loading a DeepSeek-V4 artifact
past the plan would bring back the bugs the plan exists to fix.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["ModelPathError", "resolve_model_dir", "model_source"]

# what the plan reads: the config and the safetensors (headers); vLLM's loader downloads the same files
PATTERNS = ["*.json", "*.safetensors"]


class ModelPathError(ValueError):
    """The model is neither a local directory nor resolvable to one (hub / HF cache / ModelScope)."""


def model_source(obj: Any) -> tuple[str, str | None, str | None, Any]:
    """``(model, revision, download_dir, ignore_patterns)`` of a ``VllmConfig`` (its draft's model where it has
    a speculative config), a ``ModelConfig`` or an HF config (``_name_or_path``; revision and download dir then
    from vLLM's current config when it names the same model)."""
    sc = getattr(obj, "speculative_config", None)
    mc = getattr(sc, "draft_model_config", None) or getattr(obj, "model_config", None) or obj
    load = getattr(obj, "load_config", None)
    name = getattr(mc, "model", None)
    if not isinstance(name, str) or not name:
        name = getattr(getattr(mc, "hf_config", None), "_name_or_path", None) or getattr(mc, "_name_or_path", None)
    if not isinstance(name, str) or not name:
        raise ModelPathError(f"{type(obj).__name__}: names no model (no .model, no _name_or_path)")
    revision = getattr(mc, "revision", None)
    if load is None:                      # an HF config: vLLM's current config carries revision + download dir
        cur = _current_vllm_config()
        cmc = getattr(cur, "model_config", None)
        if cmc is not None and name in (getattr(cmc, "model", None), getattr(cmc, "served_model_name", None)):
            revision = revision or getattr(cmc, "revision", None)
            load = getattr(cur, "load_config", None)
    return (name, revision if isinstance(revision, str) else None, getattr(load, "download_dir", None),
            getattr(load, "ignore_patterns", None))


def _current_vllm_config() -> Any:
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return None
    return get_current_vllm_config_or_none()


def _modelscope(model: str, revision: str | None) -> str | None:
    if os.environ.get("VLLM_USE_MODELSCOPE", "").lower() not in ("1", "true"):
        return None
    from vllm.model_executor.model_loader.weight_utils import maybe_download_from_modelscope

    return maybe_download_from_modelscope(model, revision)


def resolve_model_dir(model: str, revision: str | None = None, download_dir: str | None = None,
                      ignore_patterns: Any = None) -> str:
    """The local directory of ``model``: itself when it is one, else its snapshot in the HF cache (downloaded
    as vLLM's loader would, unless ``HF_HUB_OFFLINE``). Raises :class:`ModelPathError` naming the model and
    why it cannot be resolved."""
    if os.path.isdir(model):
        return model
    path = _modelscope(model, revision)
    if path is None:
        try:
            from huggingface_hub import constants, snapshot_download
        except ImportError as e:
            raise ModelPathError(f"{model!r} is not a local directory and huggingface_hub is not installed "
                                 f"to resolve it as a hub id ({e})") from e
        try:
            path = snapshot_download(repo_id=model, revision=revision, cache_dir=download_dir,
                                     allow_patterns=PATTERNS, ignore_patterns=ignore_patterns,
                                     local_files_only=bool(constants.HF_HUB_OFFLINE))
        except Exception as e:            # hub errors come in many types; all mean "not resolvable"
            where = download_dir or constants.HF_HUB_CACHE
            raise ModelPathError(
                f"{model!r} is not a local directory and cannot be resolved as a hub id (revision "
                f"{revision or 'main'}, cache {where}, offline={bool(constants.HF_HUB_OFFLINE)}): "
                f"{type(e).__name__}: {e}. DeepSeek-V4 weights load only through the load plan, which needs "
                "the artifact's safetensors on disk: pass a local directory or make the hub id available "
                "in the cache") from e
    path = str(path)
    if not os.path.isdir(path) or not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise ModelPathError(f"{model!r} resolved to {path}, which holds no *.safetensors file; DeepSeek-V4 "
                             "weights load only through the load plan (safetensors headers)")
    return path
