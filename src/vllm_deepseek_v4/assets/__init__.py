"""Models shipped inside the package.

``tiny/``: a small DSv4 (main + one MTP layer, every attention layer type, a hash layer, routed + shared
experts) trained on CPU by ``scripts/train_tiny.py`` on Python's own docs and stdlib source. It is an
upstream-format BF16 artifact (``config.json``, ``model.safetensors``, HF tokenizer files) that both our
loader and vLLM read; the demo, the vLLM end-to-end tests and the acceptance benchmarks use it.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_model_path"]

_TINY = Path(__file__).resolve().parent / "tiny"


def tiny_model_path() -> str:
    """Directory of the embedded tiny model; raises ``FileNotFoundError`` if the install lacks its files."""
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
               if not (_TINY / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{_TINY}: the embedded tiny model is missing {', '.join(missing)} "
                                "(rebuild it with scripts/train_tiny.py, or reinstall the package)")
    return str(_TINY)
