"""Create the upstream PR branch ``deepseek-v4-mtp-loader`` in a vLLM git work tree (0.32 layout).

    python scripts/upstream_branch.py VLLM_TREE [--branch deepseek-v4-mtp-loader] [--force]

VLLM_TREE is a git work tree whose ``vllm/`` is vLLM's Python package in the 0.32 layout
(``vllm/models/deepseek_v4/{nvidia,amd,xpu}/{model,mtp}.py``). A ``git init``-ed copy of an installed vllm
package is enough::

    mkdir /tmp/vt && cp -r .venv/lib/python3*/site-packages/vllm /tmp/vt/ && cd /tmp/vt \\
        && git init -q && git add -A && git commit -qm base

The branch is built from this repository's HEAD (``git archive``: uncommitted edits of the work tree are never
carried); the output and the branch's commit message name that commit. Without git (a copy of the files, not
a clone) the script refuses.

The branch gets one commit:

1. ``vllm/models/deepseek_v4/loading/``: our load planner (checkpoint headers, naming conventions, per-module
   quant detection, the strict load plan: the import closure of ``loader/plan.py``, stdlib only) and the
   native loader (``native/tables.py``, ``loader.py``, ``quant_config.py``, ``glue.py``), copied from this
   package with every ``vllm_deepseek_v4`` import made relative; nothing imports ``vllm_deepseek_v4``.
2. Anchored edits of vLLM's ``nvidia`` / ``amd`` / ``xpu`` ``model.py`` and ``mtp.py``: the target's and the
   draft's ``load_weights`` go through the plan (``glue.load_weights_from_plan``; a hub id is resolved to its
   HF-cache snapshot, an unresolvable model refused; vLLM's stock mapping only with
   ``VLLM_DSV4_STOCK_LOADER=1``), and the MTP layer is
   built with its own quant config (``glue.mtp_quant_config``) instead of the target's object. Every anchor
   must occur exactly once, or the script stops naming the file and the anchor.
3. ``tests/models/deepseek_v4/``: CPU tests (``scripts/upstream/tests/``), run from VLLM_TREE with
   ``VLLM_PLUGINS= python -m pytest tests/models/deepseek_v4``.

Exit 0 on success, 2 on a tree of another layout (the message says what is missing) or a source that is not a
git clone, 1 on a failed anchor.
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG_REL = "src/vllm_deepseek_v4"
TESTS_REL = "scripts/upstream/tests"
BRANCH = "deepseek-v4-mtp-loader"
DEST = "vllm/models/deepseek_v4/loading"
# the modules the branch needs; everything they import from this package comes along (import closure)
ROOTS = ("loader/plan.py", "native/glue.py", "native/loader.py", "native/tables.py", "native/quant_config.py",
         "loader/stream.py")
PLANNER_ROOTS = tuple(r for r in ROOTS if not r.startswith("native/"))
# package __init__ files written fresh (ours re-export entry points the branch does not carry)
FRESH_INITS = {
    "__init__.py": '"""DeepSeek-V4 checkpoint load planning: which on-disk tensor fills which parameter, in which\n'
                   'quant scheme, decided from safetensors headers before any weight is read (stdlib only).\n\n'
                   '``loader.build_plan(path)`` -> ``LoadPlan``; ``native.glue`` connects a plan to vLLM\'s\n'
                   'DeepSeek-V4 target and MTP classes. Origin: the vllm-deepseek-v4 project."""\n',
    "native/__init__.py": '"""Rule tables, loader and per-class quant config for vLLM\'s own DeepSeek-V4 classes."""\n',
}
LAYOUT_FILES = [f"vllm/models/deepseek_v4/{p}/{f}.py" for p in ("nvidia", "amd", "xpu") for f in ("model", "mtp")]
LAYOUT_FILES += ["vllm/models/deepseek_v4/__init__.py", "vllm/models/deepseek_v4/quant_config.py"]

_GLUE = "        from ..loading.native import glue as _plan_glue\n"


def _target_patch(indent_rest: str) -> str:
    return (_GLUE + "\n"
            "        # the load plan decides every tensor's parameter, shard and quant role (checkpoint headers,\n"
            "        # any naming convention); vLLM's own mapping only with VLLM_DSV4_STOCK_LOADER=1\n"
            "        loaded_params = _plan_glue.load_weights_from_plan(\n"
            '            self, "target", weights, _plan_glue.model_path(self.config)\n'
            "        )\n"
            "        if loaded_params is None:\n"
            "            loader = AutoWeightsLoader(self)\n"
            + indent_rest)


_OLD_TARGET = ("        loader = AutoWeightsLoader(self)\n"
               "        loaded_params = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)\n")
_NEW_TARGET = _target_patch("            loaded_params = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)\n")
_OLD_TARGET_AMD = ("        loader = AutoWeightsLoader(self)\n"
                   "        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)\n")
_NEW_TARGET_AMD = _NEW_TARGET + "        return loaded_params\n"


def _mtp_load(after: str) -> tuple[str, str]:
    old = ("    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:\n"
           "        # Weight name remapping for checkpoint compatibility.\n")
    new = ("    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:\n"
           + _GLUE + "\n"
           "        # The load plan routes every tensor, including the top-level head / embed the draft shares\n"
           "        # (never skipped), and refuses what it cannot place; None: VLLM_DSV4_STOCK_LOADER=1\n"
           "        loaded = _plan_glue.load_weights_from_plan(\n"
           '            self, "mtp", weights, _plan_glue.model_path(self.config)\n'
           "        )\n"
           "        if loaded is not None:\n"
           f"            self.{after}()\n"
           "            return loaded\n"
           "        # Weight name remapping for checkpoint compatibility.\n")
    return old, new


_OLD_MTP_QC = "\n        quant_config = vllm_config.quant_config\n"
_NEW_MTP_QC = ("\n" + _GLUE +
               "\n        # the draft's own quant config, from the schemes of the draft's tensors (not the target's)\n"
               "        quant_config = _plan_glue.mtp_quant_config(vllm_config, vllm_config.quant_config)\n"
               "        # the MTP block (vLLM's decoder layer) reads vllm_config.quant_config: give it the draft's\n"
               "        vllm_config = _plan_glue.with_quant_config(vllm_config, quant_config)\n")
_OLD_MTP_SELF_QC = "\n        self.quant_config = vllm_config.quant_config\n"
_NEW_MTP_SELF_QC = ("\n" + _GLUE +
                    "\n        self.quant_config = _plan_glue.mtp_quant_config(vllm_config, vllm_config.quant_config)\n")

_OLD_TARGET_INIT = ("        self.model = self.model_cls(\n"
                    '            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model")\n'
                    "        )\n")
_NEW_TARGET_INIT = (_GLUE + "\n"
                    "        # compressed-tensors targets name checkpoint modules, never vLLM's (KeyError on\n"
                    "        # ...weight_global_scale): the trunk's config from the plan, in vLLM's runtime names\n"
                    "        vllm_config = _plan_glue.with_quant_config(\n"
                    "            vllm_config, _plan_glue.target_quant_config(vllm_config, vllm_config.quant_config)\n"
                    "        )\n" + _OLD_TARGET_INIT +
                    "        # an NVFP4 wo_a: vLLM's o_proj reads the weight itself; our decode at load (Triton)\n"
                    "        _plan_glue.install_own_kernels(self, vllm_config)\n")
_OLD_MTP_INIT = ("        self.model = DeepSeekV4MultiTokenPredictor(\n"
                 '            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model")\n'
                 "        )\n")
_NEW_MTP_INIT = (_OLD_MTP_INIT +                 # _plan_glue: imported above in this __init__ (_NEW_MTP_SELF_QC)
                 "        # an NVFP4 wo_a: vLLM's o_proj reads the weight itself; our decode at load (Triton)\n"
                 "        _plan_glue.install_own_kernels(self, vllm_config)\n")

# file -> [(anchor, replacement)]: each anchor must occur exactly once
PATCHES: dict[str, list[tuple[str, str]]] = {
    "vllm/models/deepseek_v4/nvidia/model.py": [(_OLD_TARGET, _NEW_TARGET), (_OLD_TARGET_INIT, _NEW_TARGET_INIT)],
    "vllm/models/deepseek_v4/xpu/model.py": [(_OLD_TARGET, _NEW_TARGET), (_OLD_TARGET_INIT, _NEW_TARGET_INIT)],
    "vllm/models/deepseek_v4/amd/model.py": [(_OLD_TARGET_AMD, _NEW_TARGET_AMD), (_OLD_TARGET_INIT, _NEW_TARGET_INIT)],
    "vllm/models/deepseek_v4/nvidia/mtp.py": [_mtp_load("process_weights_after_loading"), (_OLD_MTP_QC, _NEW_MTP_QC),
                                              (_OLD_MTP_SELF_QC, _NEW_MTP_SELF_QC), (_OLD_MTP_INIT, _NEW_MTP_INIT)],
    "vllm/models/deepseek_v4/amd/mtp.py": [_mtp_load("process_weights_after_loading"), (_OLD_MTP_QC, _NEW_MTP_QC),
                                           (_OLD_MTP_SELF_QC, _NEW_MTP_SELF_QC), (_OLD_MTP_INIT, _NEW_MTP_INIT)],
    "vllm/models/deepseek_v4/xpu/mtp.py": [_mtp_load("finalize_mega_moe_weights"), (_OLD_MTP_QC, _NEW_MTP_QC),
                                           (_OLD_MTP_SELF_QC, _NEW_MTP_SELF_QC), (_OLD_MTP_INIT, _NEW_MTP_INIT)],
}


class Refused(Exception):
    pass


# ---- our sources, as committed ----
def export_head(root: Path, dest: Path) -> str:
    """Write ``PKG_REL`` and ``TESTS_REL`` as committed at ``root``'s HEAD into ``dest`` (``git archive``: the
    branch never carries uncommitted edits of this work tree); returns the commit's hash."""
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    if r.returncode != 0 or Path(r.stdout.strip()).resolve() != root.resolve():
        raise Refused(f"{root}: not a git work tree of vllm-deepseek-v4 (the branch is built from a commit: "
                      "clone the repository instead of copying files)")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if sha.returncode != 0:
        raise Refused(f"{root}: has no commit to build the branch from ({sha.stderr.strip()})")
    arc = subprocess.run(["git", "archive", "--format=tar", "HEAD", PKG_REL, TESTS_REL], cwd=root,
                         capture_output=True)
    if arc.returncode != 0:
        raise Refused(f"{root}: git archive HEAD {PKG_REL} {TESTS_REL}: {arc.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(arc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return sha.stdout.strip()


# ---- the import closure of ROOTS inside this package ----
def _module_file(pkg: Path, parts: list[str]) -> Path | None:
    p = pkg.joinpath(*parts)
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def _imports(pkg_root: Path, f: Path) -> list[tuple[list[str], list[str]]]:
    rel = f.relative_to(pkg_root).with_suffix("").parts
    pkg = list(rel[:-1])
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".") if node.module else []
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                out.append((base + mod, [a.name for a in node.names]))
            elif mod and mod[0] == "vllm_deepseek_v4":
                out.append((mod[1:], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "vllm_deepseek_v4":
                    raise Refused(f"{f.relative_to(pkg_root)}: `import {a.name}` cannot be made relative; "
                                  "use `from`")
    return out


def closure(pkg: Path, roots: tuple[str, ...] = ROOTS) -> list[Path]:
    seen: dict[Path, None] = {}
    todo = [pkg / r for r in roots]
    fresh = {pkg / k for k in FRESH_INITS}
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen[f] = None
        rel = f.relative_to(pkg).parts
        for i in range(1, len(rel)):
            init = pkg.joinpath(*rel[:i], "__init__.py")
            if init.is_file():
                todo.append(init)
        if f in fresh:
            continue
        for parts, names in _imports(pkg, f):
            mf = _module_file(pkg, parts)
            if mf is None:
                raise Refused(f"{f.relative_to(pkg)}: imports {'.'.join(parts)}, which is not in the package")
            todo.append(mf)
            if mf.name == "__init__.py":
                todo += [s for n in names if (s := _module_file(pkg, parts + [n])) is not None]
    return sorted(seen)


def _relative(text: str, rel: Path) -> str:
    """``from vllm_deepseek_v4.x import y`` -> ``from ..x import y`` for a module at ``rel`` in the package."""
    depth = len(rel.parts) - 1                       # packages between the root and this module
    dots = "." * (depth + 1)

    out = re.sub(r"(?m)^(\s*from )vllm_deepseek_v4((?:\.\w+)*)(?= import)",
                 lambda m: f"{m.group(1)}{dots}{m.group(2).lstrip('.')}", text)
    if re.search(r"(?m)^\s*(from|import) vllm_deepseek_v4\b", out):
        raise Refused(f"{rel}: an import of vllm_deepseek_v4 is left after rewriting")
    return out


def torch_at_import(text: str) -> bool:
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            return True
    return False


# ---- the tree ----
def check_tree(tree: Path) -> None:
    if not (tree / ".git").exists():
        raise Refused(f"{tree}: not a git work tree (no .git); `git init` a copy of vLLM first")
    missing = [f for f in LAYOUT_FILES if not (tree / f).is_file()]
    if missing:
        raise Refused(f"{tree}: not vLLM's 0.32 package layout: missing {', '.join(missing)} "
                      "(VLLM_TREE must contain vllm/ with vllm/models/deepseek_v4/{nvidia,amd,xpu}/)")
    if (tree / DEST).exists():
        raise Refused(f"{tree}: {DEST} already exists (branch applied already?)")
    r = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip():
        raise Refused(f"{tree}: the work tree is not clean (commit or discard changes first)")


def patch_file(path: Path, edits: list[tuple[str, str]], rel: str) -> None:
    text = path.read_text()
    for old, new in edits:
        n = text.count(old)
        if n != 1:
            first = old.strip().splitlines()[0]
            raise RuntimeError(f"{rel}: anchor {'not found' if n == 0 else f'found {n} times'}: {first!r}")
        text = text.replace(old, new)
    path.write_text(text)


def git(tree: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def build(tree: Path, branch: str, root: Path = ROOT) -> dict[str, object]:
    """Create ``branch`` in ``tree`` from ``root``'s HEAD (committed sources only)."""
    check_tree(tree)
    with tempfile.TemporaryDirectory(prefix="dsv4-upstream-") as tmp:
        commit = export_head(root, Path(tmp))
        out = _build(tree, branch, Path(tmp) / PKG_REL, Path(tmp) / TESTS_REL, commit)
    return {**out, "commit": commit}


def _build(tree: Path, branch: str, pkg: Path, tests_dir: Path, commit: str) -> dict[str, list[str]]:
    files = closure(pkg)
    git(tree, "checkout", "-q", "-b", branch)
    copied, torch_free = [], []
    planner = set(closure(pkg, PLANNER_ROOTS))     # must stay stdlib-only (the kernels may import torch)
    for f in files:
        rel = f.relative_to(pkg)
        dest = tree / DEST / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = FRESH_INITS.get(rel.as_posix()) or _relative(f.read_text(), rel)
        if f in planner and torch_at_import(text):
            raise Refused(f"{rel}: imports torch at module level; the planner must stay stdlib-only")
        dest.write_text(text)
        copied.append(f"{DEST}/{rel.as_posix()}")
        if f in planner:
            torch_free.append(rel.as_posix())
    for rel, edits in PATCHES.items():
        patch_file(tree / rel, edits, rel)
    tdest = tree / "tests" / "models" / "deepseek_v4"
    tdest.mkdir(parents=True, exist_ok=True)
    tests = []
    for f in sorted(tests_dir.iterdir()):
        if f.is_file() and f.suffix in (".py", ".json"):
            shutil.copy2(f, tdest / f.name)
            tests.append(f"tests/models/deepseek_v4/{f.name}")
    for f in ("standins.py",):            # CPU stand-ins for constructing the nvidia classes (test-only)
        text = _relative((pkg / "native" / f).read_text(), Path("native") / f)
        (tdest / f"cpu_{f}").write_text(text)
        tests.append(f"tests/models/deepseek_v4/cpu_{f}")
    git(tree, "add", "-A")
    msg = ("[Model] DeepSeek-V4: load target and MTP through a header-level load plan; the MTP gets its own "
           "quant config\n\n"
           "- vllm/models/deepseek_v4/loading/: stdlib-only load planner (safetensors headers, naming\n"
           "  conventions, per-module quant detection, strict accounting) + rule tables into vLLM's parameters\n"
           "- nvidia/amd/xpu model.py + mtp.py: load_weights through the plan (hub ids via the HF cache;\n"
           "  stock mapping only with VLLM_DSV4_STOCK_LOADER=1); the MTP layer's quant config from the draft's\n"
           "  own tensors\n"
           "- tests/models/deepseek_v4: CPU construction + loading tests\n\n"
           "Fixes: vllm#43456 (MTP head/embed skipped), vllm#43304 (draft inherits the target's quant config),\n"
           "the ignore-prefix mismatch of vllm#56054 for DeepSeek-V4 drafts.\n\n"
           f"Built from vllm-deepseek-v4 commit {commit}.")
    git(tree, "-c", "user.name=vllm-deepseek-v4", "-c", "user.email=vllm-deepseek-v4@localhost",
        "commit", "-q", "-m", msg)
    return {"copied": copied, "torch_free": torch_free, "patched": list(PATCHES), "tests": tests}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", help="a git work tree whose vllm/ is vLLM's package (0.32 layout)")
    ap.add_argument("--branch", default=BRANCH)
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    try:
        out = build(tree, args.branch)
    except (Refused, RuntimeError) as e:     # refused: wrong tree or unportable code (2); failed: an anchor or git (1)
        refused = isinstance(e, Refused)
        print(f"upstream_branch: {'refused' if refused else 'failed'}: {e}", file=sys.stderr)
        return 2 if refused else 1
    print(f"branch {args.branch} in {tree}, built from vllm-deepseek-v4 commit {out['commit']} (HEAD of {ROOT}; "
          "uncommitted changes are not included)")
    print(f"{len(out['copied'])} modules copied to {DEST} "
          f"({len(out['torch_free'])} planner modules, none imports torch at import time), "
          f"{len(out['patched'])} vLLM files patched, {len(out['tests'])} test files")
    print(f"run: cd {tree} && VLLM_PLUGINS= python -m pytest tests/models/deepseek_v4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
