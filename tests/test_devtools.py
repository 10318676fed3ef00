"""``vllm_deepseek_v4.devtools``: result records name no machine directory; the Flash layout's command line
writes what ``materialise`` writes."""
from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_deepseek_v4.devtools import flash
from vllm_deepseek_v4.devtools.records import REPO_ROOT, meta, portable, repo_relative


def test_paths_are_recorded_relative_to_the_checkout_or_as_placeholders():
    assert repo_relative(REPO_ROOT / "src" / "vllm_deepseek_v4" / "assets") == "src/vllm_deepseek_v4/assets"
    assert repo_relative(REPO_ROOT) == "."
    assert repo_relative(Path(tempfile.gettempdir()) / "dsv4-zoo" / "upstream_bf16") == "<tmp>/dsv4-zoo/upstream_bf16"
    assert repo_relative("/opt/models/DeepSeek-V4-Flash") == "<external>/DeepSeek-V4-Flash"
    rec = {"argv": ["x.py", "--zoo", "/tmp/z", f"--out={REPO_ROOT}/benchmarks/results/a"], "n": 3.25,
           "rows": [{"path": "relative/stays", "log_dir": "/tmp/dsv4-bench-1"}]}
    assert portable(rec) == {"argv": ["x.py", "--zoo", "<tmp>/z", "--out=benchmarks/results/a"], "n": 3.25,
                             "rows": [{"path": "relative/stays", "log_dir": "<tmp>/dsv4-bench-1"}]}
    assert not any(str(a).startswith("/") for a in meta(["b.py", str(REPO_ROOT / "x")])["argv"])


def test_flash_command_line_writes_the_materialised_layout(tmp_path, flash_dir):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "vllm_deepseek_v4.devtools.flash", "sparse", str(out)], check=True,
                   capture_output=True)
    names = sorted(p.name for p in flash_dir.iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and len(names) == 45 + 2   # shards, index, config
    for name in names:                       # the data are holes of up to 149 GB in all: compare headers and sizes
        a, b = flash_dir / name, out / name
        assert a.stat().st_size == b.stat().st_size, name
        if name.endswith(".safetensors"):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                n = 8 + struct.unpack("<Q", fa.read(8))[0]
                fa.seek(0)
                assert fa.read(n) == fb.read(n), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    assert len(flash.inventory()) == 69_187
