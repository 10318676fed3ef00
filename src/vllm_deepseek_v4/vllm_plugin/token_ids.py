"""Prompt token ids are checked against the model's vocabulary even without a tokenizer.

vLLM validates prompt token ids in the front end (``BaseRenderer.validate_token_ids``,
``vllm/renderers/base.py``, called by ``InputProcessor`` for every prompt), but skips the check when the tokenizer
is not initialised (``--skip-tokenizer-init``, ``LLM(skip_tokenizer_init=True)``). An id ``>= vocab_size`` (or a
negative one) then reaches the model's embedding, whose ``IndexError`` kills the engine core: every other request
in flight fails with it and the server stops answering (seen with the shipped tiny model: prompt ``[5, 5000, 6]``,
vocab 4096). :func:`patch_vocab_check` wraps the method so that without a tokenizer the ids are checked against
``model_config.get_vocab_size()`` and the request alone is refused (HTTP 400) with vLLM's own error type and
message; with a tokenizer vLLM's check runs unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["patch_vocab_check"]

_MARK = "_dsv4_vocab_check"


def patch_vocab_check() -> None:
    """Idempotent; called by ``register()`` in every process (the front end is the one that validates)."""
    from vllm.renderers.base import BaseRenderer

    original = BaseRenderer.validate_token_ids
    if getattr(original, _MARK, False):
        return

    def validate_token_ids(self, token_ids: Sequence[int], *, parameter: str | None = None) -> None:  # noqa: ANN001
        if token_ids and self.tokenizer is None:
            from vllm.exceptions import VLLMValidationError

            vocab = self.model_config.get_vocab_size()
            bad = next((t for t in (min(token_ids), max(token_ids)) if not 0 <= t < vocab), None)
            if bad is not None:
                raise VLLMValidationError(f"Token id {bad} is out of vocabulary (vocabulary size {vocab})",
                                          parameter=parameter)
        original(self, token_ids, parameter=parameter)

    setattr(validate_token_ids, _MARK, True)
    BaseRenderer.validate_token_ids = validate_token_ids  # type: ignore[method-assign]
