"""Readers of the tiny model's text: ``data/tiny_corpus/{train,heldout}.jsonl`` in the repository checkout.

One JSON object per line, ``{"source": "topic:NAME" | "module:NAME", "text": ...}`` (Python 3.11's reference
topics and stdlib sources; ``scripts/tiny_corpus.py build`` regenerates them). The held-out split is whole
documents never seen in training. Token streams are ``BOS doc EOS BOS doc EOS ...``; windows are cut from the
stream without overlap, so every caller (training, tests, benchmarks) sees the same held-out windows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import REPO_ROOT

__all__ = ["CORPUS_DIR", "heldout_windows", "load_split", "load_tokenizer", "token_stream", "token_windows"]

CORPUS_DIR = REPO_ROOT / "data" / "tiny_corpus"


def load_split(split: str, corpus: Path = CORPUS_DIR) -> list[dict[str, str]]:
    """The documents of ``train`` or ``heldout``."""
    path = corpus / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus split (run scripts/tiny_corpus.py build)")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def token_stream(docs: list[dict[str, str]], tokenizer: Any, bos_id: int, eos_id: int) -> list[int]:
    """``BOS doc EOS BOS doc EOS ...`` with a ``tokenizers.Tokenizer`` (special tokens added here, not by it)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch([d["text"] for d in docs], add_special_tokens=False):
        ids += [bos_id, *enc.ids, eos_id]
    return ids


def token_windows(ids: list[int], seq_len: int) -> Any:
    """Non-overlapping ``[n, seq_len]`` LongTensor windows of the stream (the ragged tail is dropped)."""
    import torch

    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_tokenizer(artifact: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` of an artifact directory (its ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    tok_file = Path(artifact) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{artifact}: no tokenizer.json (the zoo copies the source's tokenizer into "
                                "every layout)")
    return Tokenizer.from_file(str(tok_file))


def heldout_windows(artifact: str | Path, n: int, seq_len: int) -> Any:
    """The first ``n`` windows of ``seq_len`` tokens of the held-out split, with the artifact's tokenizer
    (``<|bos|>`` / ``<|eos|>`` as document separators)."""
    tok = load_tokenizer(artifact)
    ids = token_stream(load_split("heldout"), tok, tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>"))
    return token_windows(ids, seq_len)[:n]
