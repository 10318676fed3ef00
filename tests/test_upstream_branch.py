"""``scripts/upstream_branch.py``: the upstream PR branch, built in a fresh git copy of the installed vLLM
package, and the branch's own tests run there (tree first on sys.path, this package's plugin not loaded).

The branch's tests build vLLM's nvidia and xpu target + MTP for 10 layouts on CPU: about 5 minutes on 2 cores
(copying the installed package included). The HEAD test builds a branch from a clone (no vLLM copy): seconds.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "upstream_branch.py"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")]


def _git(tree: Path, *args: str) -> str:
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tree, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _vllm_tree(tmp: Path) -> Path:
    src = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    tree = tmp / "vllm-tree"
    shutil.copytree(src, tree / "vllm", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / ".gitignore").write_text("*.so\n__pycache__/\n")        # native extensions: present, not tracked
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-qm", "base")
    return tree


def test_branch_builds_and_its_tests_pass(tmp_path: Path) -> None:
    tree = _vllm_tree(tmp_path)
    r = subprocess.run([sys.executable, str(SCRIPT), str(tree)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _git(tree, "rev-parse", "--abbrev-ref", "HEAD").strip() == "deepseek-v4-mtp-loader"
    assert len(_git(tree, "log", "--oneline").splitlines()) == 2
    loading = tree / "vllm/models/deepseek_v4/loading"
    for f in loading.rglob("*.py"):
        assert "vllm_deepseek_v4" not in "".join(l for l in f.read_text().splitlines(True)
                                                 if l.lstrip().startswith(("from ", "import "))), f
    env = {**os.environ, "VLLM_PLUGINS": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models/deepseek_v4"],
                       cwd=tree, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
    # a second run refuses (already applied), another layout is refused with what is missing
    assert subprocess.run([sys.executable, str(SCRIPT), str(tree)], capture_output=True).returncode == 2
    other = tmp_path / "other"
    (other / "vllm").mkdir(parents=True)
    _git(other, "init", "-q")
    r = subprocess.run([sys.executable, str(SCRIPT), str(other)], capture_output=True, text=True)
    assert r.returncode == 2 and "0.32 package layout" in r.stderr


def _deepseek_v4_tree(tree: Path) -> Path:
    """A git tree holding only ``vllm/models/deepseek_v4`` (the files the script checks and edits): enough to
    build the branch, not to run its tests."""
    src = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "models" / "deepseek_v4"
    shutil.copytree(src, tree / "vllm" / "models" / "deepseek_v4", ignore=shutil.ignore_patterns("__pycache__"))
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-qm", "base")
    return tree


def test_branch_is_built_from_head_not_the_work_tree(tmp_path: Path) -> None:
    """An uncommitted edit of our sources never reaches the branch; the output and the branch's commit name
    the commit it was built from; a copy of our files without git is refused."""
    ours = tmp_path / "ours"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(ours)], check=True, capture_output=True)
    head = _git(ours, "rev-parse", "HEAD").strip()
    glue = ours / "src/vllm_deepseek_v4/native/glue.py"
    glue.write_text(glue.read_text() + "\nUNCOMMITTED_MARKER = 1\n")
    tree = _deepseek_v4_tree(tmp_path / "vt")
    r = subprocess.run([sys.executable, str(ours / "scripts/upstream_branch.py"), str(tree)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"built from vllm-deepseek-v4 commit {head}" in r.stdout
    assert f"Built from vllm-deepseek-v4 commit {head}." in _git(tree, "log", "-1", "--format=%B")
    branch_glue = (tree / "vllm/models/deepseek_v4/loading/native/glue.py").read_text()
    assert "def load_weights_from_plan" in branch_glue and "UNCOMMITTED_MARKER" not in branch_glue
    copy = tmp_path / "copy"
    shutil.copytree(ours, copy, ignore=shutil.ignore_patterns(".git"))
    r = subprocess.run([sys.executable, str(copy / "scripts/upstream_branch.py"),
                        str(_deepseek_v4_tree(tmp_path / "vt2"))], capture_output=True, text=True)
    assert r.returncode == 2 and "not a git work tree of vllm-deepseek-v4" in r.stderr, r.stderr
