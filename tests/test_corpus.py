"""The corrupt-artifact corpus (``devtools/corrupt*.py``): every broken artifact derived from the shipped tiny
model and the FP8 + MXFP4 zoo layout is refused by ``dsv4 verify`` (run in-process) with the documented exit
code and one line naming the file and/or tensor at fault, never a traceback (a ``values`` case passes plain
``verify`` and is refused by ``verify --values``); the portable load refuses the
``load`` subset with our own error; every benign change verifies and loads to the base's logits, bit for bit.

``tests/README.md`` lists the categories with their counts; ``test_readme_counts`` keeps it true.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import re
import shutil
import tempfile
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch

from vllm_deepseek_v4.cli.main import main as dsv4
from vllm_deepseek_v4.devtools.corrupt import Base, Case, copy_base, write_bases
from vllm_deepseek_v4.devtools.corrupt_cases import CATEGORIES, build_cases
from vllm_deepseek_v4.errors import DSV4Error
from vllm_deepseek_v4.loader.load import load_model

IDS = torch.tensor([[0, 17, 42, 7, 99, 1, 250, 12, 5, 64, 33, 8]])


@cache
def bases() -> dict[str, Base]:
    """The two good artifacts, written once per session (the cases are derived from their headers, so they are
    needed to collect the tests)."""
    root = Path(tempfile.mkdtemp(prefix="dsv4-corpus-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_bases(root)


CASES = build_cases(bases()["tiny"], bases()["quant"])
BROKEN = [c for c in CASES if not c.benign]
BENIGN = [c for c in CASES if c.benign]


def verify(path: Path, *flags: str) -> tuple[int, str]:
    """``dsv4 verify [FLAGS] PATH`` in-process: exit code and stdout + stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = dsv4(["verify", *flags, str(path)])
    return rc, out.getvalue() + err.getvalue()


def prepare(case: Case, tmp_path: Path) -> Path:
    return case.mutate(copy_base(bases()[case.base].path, tmp_path / "artifact"))


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.name)
def test_broken_artifact_is_refused_by_name(case: Case, tmp_path: Path) -> None:
    path = prepare(case, tmp_path)
    if case.values:                                     # the headers are fine: plain verify passes
        assert verify(path)[0] == 0
    rc, text = verify(path, *(["--values"] if case.values else []))
    assert "Traceback" not in text
    assert rc == case.exit_code, text
    lines = text.strip().splitlines()
    expect = [e.replace("{dir}", str(tmp_path / "artifact")) for e in case.expect]
    assert any(all(e in line for e in expect) for line in lines), f"no line names all of {expect}:\n{text}"
    if case.category in ("fs", "header", "index", "values"):    # one problem, one line
        assert len(lines) == 1, text
    if case.load:
        with pytest.raises(DSV4Error):
            load_model(str(path), dtype=torch.float32, progress=False)


@cache
def logits(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Main and MTP-draft logits of the portable model loaded from ``path`` (fp32, a few tokens)."""
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    with torch.no_grad():
        main, hidden = model(IDS)
        draft, _ = model.forward_mtp(hidden[:, :-1], IDS[:, 1:], model.new_mtp_state(), k=0)
    return main, draft


@pytest.mark.parametrize("case", BENIGN, ids=lambda c: c.name)
def test_benign_change_loads_to_identical_logits(case: Case, tmp_path: Path) -> None:
    path = prepare(case, tmp_path)
    rc, text = verify(path)
    assert rc == 0 and "Traceback" not in text, text
    main, draft = logits(str(path))
    ref_main, ref_draft = logits(str(bases()[case.base].path))
    assert torch.equal(main, ref_main) and torch.equal(draft, ref_draft)


def test_corpus_size_and_categories() -> None:
    """At least 100 broken artifacts, every category represented; each expectation names a file or a tensor."""
    counts = Counter(c.category for c in CASES)
    assert len(BROKEN) >= 100 and set(counts) == set(CATEGORIES) and min(counts.values()) >= 8, counts
    for c in BROKEN:
        assert c.expect and any(re.search(r"\.(safetensors|json)\b|^[\w*]+(\.[\w*]+)+$|\bmtp\.|\{dir\}", e)
                                for e in c.expect), c.name


def test_readme_counts() -> None:
    """tests/README.md's corpus table says how many cases each category has."""
    text = (Path(__file__).parent / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", text, flags=re.M))
    counts = Counter(c.category for c in CASES)
    assert {k: int(v) for k, v in table.items() if k in CATEGORIES} == dict(counts)
