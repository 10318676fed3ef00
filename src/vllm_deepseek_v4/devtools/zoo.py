"""Every DSv4 artifact layout users meet, written from one BF16 model (by default the shipped tiny model).

Each layout is a directory with its own ``config.json`` (plus the ``quantization_config`` its real producer
writes, and ``hf_quant_config.json`` for ModelOpt) and the source's tokenizer files. Quantized layouts hold
the real quantization of the source weights (``zoo_formats`` says which library made which tensors);
renaming uses ``artifacts``, written independently of the loader's rule tables.

After writing, every layout is checked: ``dsv4 verify`` passes (``hf_transformers`` must instead fail with
our missing-MTP message and pass with ``--no-mtp``), the plan's per-stack schemes are the expected ones, the
``quantization_config`` agrees with the tensors, and ``load_model`` fills the model. ``OUT_DIR/zoo.json``
indexes the layouts: description, naming, expected schemes for ``main`` and ``mtp.0``, equivalence classes.
Command line: ``scripts/build_zoo.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DSV4Config
from ..loader.expected import LINEAR, expected_params
from .artifacts import to_convention, write_artifact
from .records import repo_relative
from .zoo_formats import ct_config, deepseek_fp8_config, modelopt_configs, quantize_linear

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
Quant = dict[str, dict[str, tuple[str, str]]]        # part -> group -> (scheme, producer)

_FP8, _MXFP4 = ("fp8_block", "deepseek"), ("mxfp4", "deepseek")
NATIVE: Quant = {"main": {"attn": _FP8, "indexer": _FP8, "shared_experts": _FP8, "experts": _MXFP4},
                 "mtp.0": {"attn": _FP8, "shared_experts": _FP8, "experts": _MXFP4, "e_proj": _FP8, "h_proj": _FP8}}
_NV = ("nvfp4", "ct")
NVFP4_TRUNK: Quant = {"main": {"attn": _NV, "shared_experts": _NV, "experts": _NV}}
NVFP4_ALL: Quant = {**NVFP4_TRUNK, "mtp.0": {g: _NV for g in ("attn", "shared_experts", "experts", "e_proj", "h_proj")}}
MODELOPT_MIXED: Quant = {"main": {**NATIVE["main"], "experts": ("nvfp4", "modelopt")}, "mtp.0": NATIVE["mtp.0"]}
W4A16_TRUNK: Quant = {"main": {"attn": ("fp8_block", "ct"), "shared_experts": ("w4a16", "ct"),
                                "experts": ("w4a16", "ct")}}
_W4 = ("w4a16", "ct")
W4A16_MTP: Quant = {"mtp.0": {"attn": ("fp8_block", "ct"), "shared_experts": _W4, "experts": _W4, "e_proj": _W4,
                              "h_proj": _W4}}


@dataclass(frozen=True)
class Layout:
    description: str
    quant: Quant = field(default_factory=dict)
    convention: str = "upstream"
    qconfig: str = ""                 # "deepseek" | "ct" | "modelopt" | "" (none written)
    duplicate_head_embed: bool = False
    equivalent_to: str | None = None  # computes bit-identically to this layout
    has_mtp: bool = True


LAYOUTS: dict[str, Layout] = {
    "upstream_bf16": Layout("the BF16 release in upstream names (embed/head once, mtp.0.* without head)"),
    "upstream_fp8_mxfp4": Layout("the official release format: FP8 block (e8m0 .scale) attention, indexer, shared "
                                 "experts and MTP e_proj/h_proj, MXFP4 routed experts, trunk and MTP",
                                 NATIVE, qconfig="deepseek"),
    "hf_transformers": Layout("transformers' own save_pretrained of upstream_bf16 (DeepseekV4ForCausalLM): "
                              "mixed names, lossy attn.norm, and no mtp.* at all", has_mtp=False),
    "hf_names_with_mtp": Layout("HF parameter names (q_a_proj, fused gate_up_proj experts, lm_head) with the MTP "
                                "kept under model.mtp.0", convention="hf", equivalent_to="upstream_bf16"),
    "nvfp4_trunk_bf16_mtp": Layout("compressed-tensors NVFP4 (nvfp4-pack-quantized, by the library) attention and "
                                   "experts of the trunk, BF16 MTP (ignored by name and runtime prefix)",
                                   NVFP4_TRUNK, qconfig="ct"),
    "nvfp4_trunk_nvfp4_mtp": Layout("compressed-tensors NVFP4 attention and experts in the trunk and the MTP, "
                                    "NVFP4 e_proj/h_proj", NVFP4_ALL, qconfig="ct"),
    "modelopt_mixed": Layout("the published NVFP4 layout: ModelOpt NVFP4 main routed experts (weight_scale_2), "
                             "native FP8 attention and shared experts, MTP untouched native FP8 + MXFP4",
                             MODELOPT_MIXED, qconfig="modelopt"),
    "w4a16_trunk": Layout("compressed-tensors W4A16 (pack-quantized, group 32, by the library) experts and shared "
                          "experts, FP8_BLOCK attention, BF16 MTP", W4A16_TRUNK, qconfig="ct"),
    "head_embed_duplicated": Layout("upstream BF16 plus mtp.0.head.weight (fp32 copy) and mtp.0.emb.tok_emb.weight "
                                    "as canada-quant ships them", duplicate_head_embed=True,
                                    equivalent_to="upstream_bf16"),
    "vllm_internal": Layout("vLLM's internal names: fused_wqa_wkv / fused_wkv_wgate / gate_up_proj / w13 stacks, "
                            "MTP at model.layers.{L}.mtp_block.*", convention="vllm", equivalent_to="upstream_bf16"),
}


# Draft-quantization study (benchmarks/draft_quant_acceptance.py): pairs of layouts with the *same* trunk, so the
# target (and its greedy text) is identical and only the draft's format differs. Built by ``--draft-study`` only,
# never by the test suite's zoo.
DRAFT_STUDY: dict[str, Layout] = {
    "bf16_trunk_fp8_mxfp4_mtp": Layout("upstream_bf16's trunk; MTP as the official release ships it: FP8 block "
                                       "attention, shared experts, e_proj/h_proj, MXFP4 routed experts",
                                       {"mtp.0": NATIVE["mtp.0"]}, qconfig="deepseek"),
    "bf16_trunk_nvfp4_mtp": Layout("upstream_bf16's trunk; MTP compressed-tensors NVFP4 as in nvfp4_trunk_nvfp4_mtp",
                                   {"mtp.0": NVFP4_ALL["mtp.0"]}, qconfig="ct"),
    "bf16_trunk_w4a16_mtp": Layout("upstream_bf16's trunk; MTP with w4a16_trunk's recipe: compressed-tensors W4A16 "
                                   "(group 32) experts, shared experts and e_proj/h_proj, FP8_BLOCK attention",
                                   W4A16_MTP, qconfig="ct"),
    "fp8_mxfp4_trunk_bf16_mtp": Layout("upstream_fp8_mxfp4's trunk (FP8 block + MXFP4), BF16 MTP",
                                       {"main": NATIVE["main"]}, qconfig="deepseek"),
}
ALL_LAYOUTS: dict[str, Layout] = {**LAYOUTS, **DRAFT_STUDY}


class ZooError(RuntimeError):
    """A written layout does not verify, plan or load as expected."""


def expected_schemes(layout: Layout, report: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The plan's report with every group set to what ``layout`` quantizes it to (others ``bf16``)."""
    return {part: {g: layout.quant.get(part, {}).get(g, ("bf16", ""))[0] for g in groups}
            for part, groups in report.items()}


# ---- source ----
def read_source(src: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], DSV4Config]:
    """Canonical (upstream-name) tensors, the raw config.json and the config of a BF16 artifact with MTP."""
    from ..loader.load import schemes_from_plan
    from ..loader.plan import build_plan
    from ..loader.stream import iter_plan_tensors

    plan = build_plan(src)
    plan.raise_if_bad()
    quantized = {f"{p}.{g}": s for p, gs in schemes_from_plan(plan).items() for g, s in gs.items() if s != "bf16"}
    if quantized:
        raise ZooError(f"{src}: the zoo is written from a BF16 model; found quantized groups {quantized}")
    if plan.cfg.n_mtp_layers < 1:
        raise ZooError(f"{src}: the source has no MTP layer (num_nextn_predict_layers = 0)")
    raw = json.loads((Path(src) / "config.json").read_text())
    raw.pop("quantization_config", None)
    return dict(iter_plan_tensors(plan, progress=False)), raw, plan.cfg


def layout_tensors(floats: dict[str, torch.Tensor], raw_cfg: dict[str, Any], cfg: DSV4Config,
                   layout: Layout) -> dict[str, torch.Tensor]:
    out = dict(floats)
    for spec in expected_params(cfg):
        scheme, producer = layout.quant.get(spec.part, {}).get(spec.group, ("bf16", ""))
        if spec.kind != LINEAR or scheme == "bf16":
            continue
        w = out.pop(f"{spec.name}.weight")
        out.update({f"{spec.name}.{sfx}": t for sfx, t in quantize_linear(scheme, producer, w).items()})
    if layout.duplicate_head_embed:
        for k in range(cfg.n_mtp_layers):
            out[f"mtp.{k}.head.weight"] = out["head.weight"].float()
            out[f"mtp.{k}.emb.tok_emb.weight"] = out["embed.weight"].clone()
    return to_convention(out, layout.convention, raw_cfg)


def quant_files(layout: Layout, cfg: DSV4Config, tensors: dict[str, torch.Tensor]) -> tuple[dict | None, dict]:
    """``(quantization_config or None, extra json files)``."""
    if layout.qconfig == "deepseek":
        return deepseek_fp8_config(), {}
    if layout.qconfig == "ct":
        return ct_config({p: {g: s for g, (s, _) in gs.items()} for p, gs in layout.quant.items()}, cfg.n_layers), {}
    if layout.qconfig == "modelopt":
        modules = sorted(n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale_2"))
        qc, hf_quant = modelopt_configs(modules)
        return qc, {"hf_quant_config.json": hf_quant}
    return None, {}


def write_layout(out: Path, name: str, floats: dict[str, torch.Tensor], raw_cfg: dict[str, Any],
                 cfg: DSV4Config) -> None:
    layout = ALL_LAYOUTS[name]
    tensors = layout_tensors(floats, raw_cfg, cfg, layout)
    qc, extra = quant_files(layout, cfg, tensors)
    write_artifact(out, tensors, {**raw_cfg, **({"quantization_config": qc} if qc else {})}, shards=2, extra_json=extra)


def save_with_transformers(src: Path, out: Path) -> dict[str, Any]:
    """Load ``src`` with transformers' DeepseekV4ForCausalLM and ``save_pretrained`` it to ``out``."""
    import transformers
    from safetensors import safe_open

    model = transformers.DeepseekV4ForCausalLM.from_pretrained(str(src), dtype="auto")
    model.save_pretrained(str(out))
    saved: list[str] = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            saved += list(fh.keys())
    n_src = len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    return {"transformers": transformers.__version__, "tensors_in": n_src, "tensors_out": len(saved),
            "mtp_tensors_out": sum(".mtp." in f".{n}" for n in saved)}


def copy_tokenizer(src: str, out: Path) -> list[str]:
    copied = [f for f in TOKENIZER_FILES if (Path(src) / f).is_file()]
    for f in copied:
        shutil.copy2(Path(src) / f, out / f)
    return copied


# ---- checks ----
def _verify_cli(path: Path, *extra: str) -> tuple[int, str]:
    from ..cli.main import main as dsv4_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = dsv4_main(["verify", str(path), *extra])
    return rc, buf.getvalue().strip()


def check_layout(path: Path, name: str, *, load: bool = True) -> dict[str, Any]:
    """Verify, plan and (optionally) load one layout; raise ZooError on anything unexpected."""
    from ..loader.config_check import quant_config_disagreements
    from ..loader.load import load_model
    from ..loader.plan import build_plan

    layout = ALL_LAYOUTS[name]
    rc, text = _verify_cli(path)
    out: dict[str, Any] = {"verify": text.splitlines()[-1]}
    if layout.has_mtp:
        if rc != 0:
            raise ZooError(f"{path}: dsv4 verify failed:\n{text}")
    else:
        if rc == 0 or "mtp.*: missing" not in text or "drops mtp.*" not in text:
            raise ZooError(f"{path}: expected dsv4 verify to fail with the missing-MTP message, got rc={rc}:\n{text}")
        rc2, text2 = _verify_cli(path, "--no-mtp")
        if rc2 != 0:
            raise ZooError(f"{path}: dsv4 verify --no-mtp failed:\n{text2}")
        out["verify_no_mtp"] = text2.splitlines()[-1]
    plan = build_plan(str(path), include_mtp=layout.has_mtp)
    report = plan.quant_report()
    want = expected_schemes(layout, report)
    parts = {"main", "mtp.0"} if layout.has_mtp else {"main"}
    if report != want or set(report) != parts:
        raise ZooError(f"{path}: planned schemes {report}, expected {want} for {sorted(parts)}")
    disagree = quant_config_disagreements(plan)
    if disagree:
        raise ZooError(f"{path}: quantization_config disagrees with the tensors: {disagree[:5]}")
    if load:
        load_model(str(path), dtype=torch.float32, include_mtp=layout.has_mtp, progress=False)
    return {**out, "naming": plan.naming, "schemes": report}


# ---- driver ----
def build_zoo(src: str, out_dir: str, *, load: bool = True, log: Any = print,
              layouts: dict[str, Layout] | None = None, index_name: str = "zoo.json") -> dict[str, Any]:
    """Write and check every layout of ``layouts`` (default: the zoo) under ``out_dir``; returns (and writes)
    the ``index_name`` index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floats, raw_cfg, cfg = read_source(src)
    index: dict[str, Any] = {"source": repo_relative(src), "layouts": {}}
    for name, layout in (LAYOUTS if layouts is None else layouts).items():
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        extra: dict[str, Any] = {}
        if name == "hf_transformers":
            with tempfile.TemporaryDirectory() as tmp:         # from upstream_bf16, whichever layouts exist
                base = Path(tmp) / "upstream_bf16"
                write_layout(base, "upstream_bf16", floats, raw_cfg, cfg)
                extra = save_with_transformers(base, d)
        else:
            write_layout(d, name, floats, raw_cfg, cfg)
        tokenizer = copy_tokenizer(src, d)
        record = check_layout(d, name, load=load)
        producers = sorted({f"{s}:{p}" for gs in layout.quant.values() for s, p in gs.values()})
        index["layouts"][name] = {"description": layout.description, "naming": record["naming"],
                                  "has_mtp": layout.has_mtp, "equivalent_to": layout.equivalent_to,
                                  "producers": producers,
                                  "expected_schemes": record["schemes"], "tokenizer": tokenizer,
                                  **{k: v for k, v in record.items() if k.startswith("verify")}, **extra}
        log(f"{name:24s} {record['naming']:9s} {record['verify']}")
    _versions(index)
    (out / index_name).write_text(json.dumps(index, indent=1))
    return index


def _versions(index: dict[str, Any]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("compressed-tensors", "transformers", "torch"):
        try:
            index.setdefault("versions", {})[pkg] = version(pkg)
        except PackageNotFoundError:
            index.setdefault("versions", {})[pkg] = None
