"""Write ``scripts/upstream/tests/layouts.json``: the header inventories of zoo layouts, for the upstream branch's
tests (which write random tensors of these names, dtypes and shapes; no vllm_deepseek_v4 needed there).

    python scripts/vllm_geometry_model.py /tmp/geo && python scripts/build_zoo.py /tmp/geo /tmp/zoo --no-load
    python scripts/upstream/make_layouts.py /tmp/zoo
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

LAYOUTS = ("upstream_bf16", "upstream_fp8_mxfp4", "modelopt_mixed", "hf_names_with_mtp", "vllm_internal",
           "head_embed_duplicated", "nvfp4_trunk_bf16_mtp", "nvfp4_trunk_nvfp4_mtp", "w4a16_trunk")
OUT = Path(__file__).resolve().parent / "tests" / "layouts.json"


def inventory(d: Path) -> dict:
    tensors = []
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                tensors.append([name, info["dtype"], info["shape"], f.name])
    extra = {p.name: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))
             if p.name not in ("model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")}
    return {"files": extra, "tensors": tensors}


def main() -> int:
    zoo = Path(sys.argv[1])
    doc = {"_note": "written by scripts/upstream/make_layouts.py from the vllm-deepseek-v4 zoo (vLLM geometry)"}
    doc.update({name: inventory(zoo / name) for name in LAYOUTS})
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(OUT, {k: len(v["tensors"]) for k, v in doc.items() if k != "_note"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
