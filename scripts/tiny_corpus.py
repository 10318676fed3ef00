"""The tiny model's training text: Python 3.11's own reference docs and stdlib sources (PSF licence).

``build`` regenerates ``data/tiny_corpus/{train,heldout}.jsonl`` from a local CPython 3.11 install (the
shipped files were made from 3.11.7; another patch release gives slightly different text). The texts are
English prose (``pydoc_data.topics``: the language reference topics ``help()`` shows) and the source of a
fixed list of pure-Python stdlib modules. The held-out split is whole documents, fixed by name below, so
no held-out text is ever seen in training.

The readers (``load_split``, ``token_stream``, ``token_windows``) live in ``vllm_deepseek_v4.devtools.corpus``.

    python scripts/tiny_corpus.py build [--out data/tiny_corpus]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from vllm_deepseek_v4.devtools.corpus import CORPUS_DIR

# Stdlib modules whose source is used (pure Python, mostly 20-100 KB each).
MODULES = [
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "codecs", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions",
    "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "inspect", "ipaddress", "json/__init__",
    "json/decoder", "json/encoder", "keyword", "linecache", "locale", "numbers", "operator", "optparse",
    "pathlib", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shlex",
    "shutil", "statistics", "string", "struct", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "traceback", "types", "typing", "uuid", "warnings", "weakref", "zipfile",
    "collections/__init__", "logging/__init__", "email/message", "urllib/parse", "html/parser",
]
# Held out from training: whole documents (about 10% of the text).
HELDOUT = {
    "module:statistics", "module:textwrap", "module:fractions", "module:shlex", "module:queue",
    "module:uuid", "topic:class", "topic:for", "topic:try", "topic:lambda", "topic:string-methods",
    "topic:typesseq", "topic:exceptions", "topic:import",
}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect() -> list[dict[str, str]]:
    """Every document as ``{"source": "topic:NAME" | "module:NAME", "text": ...}`` in a fixed order."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"tiny_corpus build: expected CPython 3.11 (the shipped corpus), found {sys.version}")
    from pydoc_data.topics import topics

    docs = [{"source": f"topic:{name}", "text": topics[name]} for name in sorted(topics)]
    for mod in MODULES:
        path = _stdlib() / f"{mod}.py"
        docs.append({"source": f"module:{mod.replace('/__init__', '')}", "text": path.read_text(encoding="utf-8")})
    return docs


def build(out: Path) -> dict[str, Any]:
    docs = collect()
    missing = sorted(HELDOUT - {d["source"] for d in docs})
    if missing:
        raise SystemExit(f"tiny_corpus build: held-out documents not in the corpus: {missing}")
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in ("train", "heldout"):
        part = [d for d in docs if (d["source"] in HELDOUT) == (split == "heldout")]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for d in part:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
        stats[split] = {"documents": len(part), "chars": sum(len(d["text"]) for d in part)}
    shutil.copyfile(_stdlib() / "LICENSE.txt", out / "LICENSE")
    return {"python": sys.version.split()[0], **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--out", type=Path, default=CORPUS_DIR)
    args = ap.parse_args()
    print(json.dumps(build(args.out), indent=1))


if __name__ == "__main__":
    main()
