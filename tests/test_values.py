"""Tensor value checks (``loader.values``): one corrupted value per case in a tiny artifact.

Each case copies an artifact written once per module, overwrites the bytes of one element in place and checks
that plain ``dsv4 verify`` (headers) still passes but says values were not read, that ``dsv4 verify --values``
names tensor, file, count and first on-disk index in one line, and that the portable load and the vLLM
plugin's ``PlanRouter`` refuse the tensor with that same line. Then: the opt-out, alias copies, and
``dsv4 compare`` refusing NaN logits.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from vllm_deepseek_v4.checkpoint import scan_checkpoint
from vllm_deepseek_v4.cli.main import main as dsv4
from vllm_deepseek_v4.devtools.artifacts import NATIVE, make_checkpoint
from vllm_deepseek_v4.errors import ConfigError, TensorValueError
from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.loader.plan import build_plan
from vllm_deepseek_v4.loader.values import SKIP_ENV
from vllm_deepseek_v4.vllm_plugin.weights import PlanRouter

# artifact name -> make_checkpoint keywords
ARTIFACTS = {
    "native": dict(schemes=NATIVE),                                              # fp8 e8m0 + mxfp4, MTP
    "ct_nvfp4": dict(schemes={"main": {"experts": "nvfp4"}}),                    # weight_global_scale (divisor)
    "modelopt": dict(schemes={"main": {"experts": "nvfp4"}}, flavor="modelopt"),  # weight_scale_2 (multiplier), []
    "f32_scales": dict(schemes={"main": {"attn": "fp8_block"}}, flavor="f32"),  # F32 block scales
    "vllm_fused": dict(convention="vllm"),                                       # stacked / fused BF16 tensors
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    return {name: make_checkpoint(root / name, **kw) for name, kw in ARTIFACTS.items()}


def corrupt(src, dst, tensor: str, index: int, value) -> str:
    """Copy artifact ``src`` to ``dst`` and overwrite element ``index`` (flat, on disk) of ``tensor`` with
    ``value`` (a number in the tensor's dtype, or raw ``bytes``). Returns the tensor's shard file name."""
    shutil.copytree(src, dst)
    info = scan_checkpoint(str(dst)).tensors[tensor]
    if isinstance(value, bytes):
        raw, size = value, len(value)
    else:
        dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[info.dtype]
        raw = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
        size = len(raw)
    with open(os.path.join(dst, info.file), "r+b") as fh:
        header = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header + info.start + index * size)
        fh.write(raw)
    return info.file


E4M3 = "F8_E4M3 codes that are numbers (bytes 0x7F and 0xFF are NaN)"
E8M0 = "E8M0 exponent bytes 0x00-0xFE (0xFF is NaN)"
E4M3_SCALE = "F8_E4M3 scale codes 0x00-0x7E (0x7F is NaN; 0x80-0xFF have the sign bit set)"
W13 = "model.layers.0.ffn.experts.routed_experts.w13_weight"
# id: (artifact, on-disk tensor, flat index, value, what the line says after "<tensor> in <file>: ")
CASES = {
    "bf16-weight-nan": ("native", "head.weight", 70, float("nan"),
                        "1 non-finite value (1 NaN, 0 Inf), first at flat index 70 (nan) (expected finite BF16 values)"),
    "hc-mixer-inf": ("native", "layers.0.hc_attn_fn", 5, float("inf"),
                     "1 non-finite value (0 NaN, 1 Inf), first at flat index 5 (inf) (expected finite F32 values)"),
    "hc-scale-minus-inf": ("native", "layers.1.hc_ffn_scale", 2, float("-inf"),
                           "1 non-finite value (0 NaN, 1 Inf), first at flat index 2 (-inf) "
                           "(expected finite F32 values)"),
    "mtp-norm-nan": ("native", "mtp.0.attn_norm.weight", 3, float("nan"),
                     "1 non-finite value (1 NaN, 0 Inf), first at flat index 3 (nan) (expected finite BF16 values)"),
    "fp8-code-0x7f": ("native", "layers.1.attn.wkv.weight", 7, b"\x7f",
                      f"1 NaN code, first at flat index 7 (byte 0x7F) (expected {E4M3})"),
    "fp8-code-0xff": ("native", "mtp.0.e_proj.weight", 100, b"\xff",
                      f"1 NaN code, first at flat index 100 (byte 0xFF) (expected {E4M3})"),
    "e8m0-scale-0xff": ("native", "layers.0.ffn.experts.1.w2.scale", 9, b"\xff",
                        f"1 NaN code, first at flat index 9 (byte 0xFF) (expected {E8M0})"),
    "tid2eid-past-end": ("native", "layers.0.ffn.gate.tid2eid", 3, 4,
                         "1 expert id outside [0, 4), first at flat index 3 (4) "
                         "(expected expert ids in [0, 4) (n_routed_experts))"),
    "tid2eid-negative": ("native", "layers.0.ffn.gate.tid2eid", 0, -1,
                         "1 expert id outside [0, 4), first at flat index 0 (-1) "
                         "(expected expert ids in [0, 4) (n_routed_experts))"),
    "ct-global-zero": ("ct_nvfp4", "layers.0.ffn.experts.0.w1.weight_global_scale", 0, 0.0,
                       "1 value not finite and > 0, first at flat index 0 (0) (expected finite weight_global_scale "
                       "values > 0; compressed-tensors divides by it)"),
    "ct-global-negative": ("ct_nvfp4", "layers.1.ffn.experts.3.w2.weight_global_scale", 0, -2.0,
                           "1 value not finite and > 0, first at flat index 0 (-2) (expected finite "
                           "weight_global_scale values > 0; compressed-tensors divides by it)"),
    "ct-global-nan": ("ct_nvfp4", "layers.0.ffn.experts.2.w3.weight_global_scale", 0, float("nan"),
                      "1 value not finite and > 0, first at flat index 0 (nan) (expected finite weight_global_scale "
                      "values > 0; compressed-tensors divides by it)"),
    "modelopt-scale2-zero": ("modelopt", "layers.0.ffn.experts.0.w1.weight_scale_2", 0, 0.0,
                             "1 value not finite and > 0, first at flat index 0 (0) (expected finite weight_scale_2 "
                             "values > 0; ModelOpt multiplies by it)"),
    "nvfp4-local-scale-nan": ("ct_nvfp4", "layers.0.ffn.experts.0.w1.weight_scale", 6, b"\x7f",
                              f"1 bad scale code (1 NaN, 0 negative or -0), first at flat index 6 (byte 0x7F) "
                              f"(expected {E4M3_SCALE})"),
    "nvfp4-local-scale-negative": ("ct_nvfp4", "layers.1.ffn.experts.2.w2.weight_scale", 3, b"\xb8",
                                   f"1 bad scale code (0 NaN, 1 negative or -0), first at flat index 3 (byte 0xB8) "
                                   f"(expected {E4M3_SCALE})"),
    "f32-block-scale-zero": ("f32_scales", "layers.0.attn.wq_a.scale", 0, 0.0,
                             "1 value not finite and > 0, first at flat index 0 (0) (expected finite scale values > 0)"),
    # a slice of a stacked [experts, w1|w3 rows, in] tensor: the index is the on-disk one
    "stacked-expert-slice": ("vllm_fused", W13, 2 * 64 * 64 + (32 + 5) * 64 + 7, float("nan"),
                             "1 non-finite value (1 NaN, 0 Inf) in the slice for layers.0.ffn.experts.2.w3.weight, "
                             f"first at flat index {2 * 64 * 64 + (32 + 5) * 64 + 7} (nan) "
                             "(expected finite BF16 values)"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, artifacts, tmp_path_factory):
    name, tensor, index, value, found = CASES[request.param]
    path = tmp_path_factory.mktemp("case") / request.param
    file = corrupt(artifacts[name], path, tensor, index, value)
    return path, f"{tensor} in {file}: {found}"


def test_headers_pass_but_say_values_were_not_read(case, capsys):
    path, _ = case
    assert dsv4(["verify", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("; headers checked; values not read -- use --values)")


def test_verify_values_prints_the_one_problem(case, capsys):
    path, line = case
    assert dsv4(["verify", "--values", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [line]
    assert captured.err == ""                        # no progress bar when stderr is not a terminal


def test_portable_load_refuses_with_the_same_line(case):
    path, line = case
    with pytest.raises(TensorValueError) as e:
        load_model(str(path), progress=False)
    assert str(e.value) == line


def test_plugin_router_refuses_with_the_same_line(case):
    path, line = case
    plan = build_plan(str(path))
    router = PlanRouter(plan, wanted=lambda key: True)
    with pytest.raises(TensorValueError) as e:
        for _ in router.route(_stream(path)):
            pass
    assert str(e.value) == line


def _stream(path):
    """vLLM's weight iterator, replayed: every on-disk tensor, shard by shard."""
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            yield from ((n, fh.get_tensor(n)) for n in fh.keys())


def test_verify_values_lists_every_problem_and_reads_each_tensor_once(artifacts, tmp_path, capsys, monkeypatch):
    path = tmp_path / "two"
    corrupt(artifacts["native"], path, "layers.0.hc_attn_fn", 1, float("nan"))
    corrupt_in_place(path, "layers.2.ffn.experts.0.w1.scale", 0, b"\xff")
    from vllm_deepseek_v4.loader import stream
    reads: list[str] = []
    real = stream.PositionalReader._read
    monkeypatch.setattr(stream.PositionalReader, "_read",
                        lambda self, info, *a: reads.append(info.name) or real(self, info, *a))
    assert dsv4(["verify", "--values", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" in ")[0] for line in out] == ["layers.0.hc_attn_fn", "layers.2.ffn.experts.0.w1.scale"]
    plan = build_plan(str(path))
    assert len(reads) == len(set(reads)) == sum(len(pp.roles) + len(pp.aliases) for pp in plan.params.values())


def corrupt_in_place(path, tensor, index, raw: bytes) -> None:
    info = scan_checkpoint(str(path)).tensors[tensor]
    with open(os.path.join(path, info.file), "r+b") as fh:
        fh.seek(8 + int.from_bytes(fh.read(8), "little") + info.start + index * len(raw))
        fh.write(raw)


def test_clean_artifacts_pass_verify_values(artifacts, capsys):
    for name, path in artifacts.items():
        assert dsv4(["verify", "--values", str(path)]) == 0, name
        line = capsys.readouterr().out.strip()
        assert "; values checked: " in line and " tensors, " in line, line


def test_progress_bar_on_request_only(artifacts, capsys):
    assert dsv4(["verify", "--values", "--progress", str(artifacts["native"])]) == 0
    err = capsys.readouterr().err
    assert err.startswith("\rverify --values: ") and "100.0%" in err and err.endswith("\n")


def test_disagreeing_alias_copy_fails_verify_values_not_verify(tmp_path, capsys):
    def dup(t):
        t["mtp.0.head.weight"] = t["head.weight"].float()
        t["mtp.0.head.weight"][3, 2] += 0.5
    path = make_checkpoint(tmp_path / "alias", edit=dup)
    assert dsv4(["verify", str(path)]) == 0
    capsys.readouterr()
    assert dsv4(["verify", "--values", str(path)]) == 1
    (line,) = capsys.readouterr().out.strip().splitlines()
    file = scan_checkpoint(str(path)).tensors["mtp.0.head.weight"].file
    assert line.startswith(f"mtp.0.head.weight in {file}: 1 values differ, max abs difference ")
    assert line.endswith(f", first at flat index {3 * 64 + 2} (expected the values of head.weight (head.weight), "
                         "of which it is a copy)")


def test_opt_out_loads_and_says_so(artifacts, tmp_path, capsys, monkeypatch):
    path = tmp_path / "nan"
    corrupt(artifacts["native"], path, "head.weight", 0, float("nan"))
    monkeypatch.setenv(SKIP_ENV, "1")
    model, _ = load_model(str(path), progress=False)
    assert any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in model.state_dict().values())
    err = capsys.readouterr().err
    assert err.count("tensor values NOT checked") == 1 and f"{SKIP_ENV}=1" in err and str(path) in err
    monkeypatch.setenv(SKIP_ENV, "0")
    with pytest.raises(TensorValueError):
        load_model(str(path), progress=False)
    monkeypatch.setenv(SKIP_ENV, "maybe")
    with pytest.raises(ConfigError, match=rf"{SKIP_ENV}.*found 'maybe'"):
        load_model(str(path), progress=False)


def test_opt_out_in_the_plugin_router_says_so(artifacts, tmp_path, capsys, monkeypatch):
    path = tmp_path / "nan"
    corrupt(artifacts["native"], path, "layers.0.hc_ffn_base", 0, float("nan"))
    monkeypatch.setenv(SKIP_ENV, "1")
    router = PlanRouter(build_plan(str(path)), wanted=lambda key: True)
    assert len(dict(router.route(_stream(path)))) == len(router.wanted)
    assert "tensor values NOT checked" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_refuses_nan(artifacts, tmp_path, capsys):
    """Refused at load by the value check; with the checks off, by the NaN logits (never 'max_abs_diff: nan')."""
    good = artifacts["native"]
    bad = tmp_path / "bad"
    file = corrupt(good, bad, "layers.0.attn_norm.weight", 0, float("nan"))
    assert dsv4(["compare", str(good), str(bad)]) == 1
    err = capsys.readouterr()
    assert "nan" not in err.out and f"layers.0.attn_norm.weight in {file}: 1 non-finite value" in err.err
    assert dsv4(["compare", "--no-value-checks", str(good), str(bad)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "tensor values NOT checked" in out.err
    assert f"main logits in {bad}: " in out.err and "(expected finite logits to compare)" in out.err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_native_loader_refuses_a_bad_value(tmp_path):
    """vLLM's own classes loaded through the plan (``native``) refuse the tensor with the same line."""
    import subprocess
    import sys

    from vllm_deepseek_v4.native import load_native

    geo = tmp_path / "geo"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts/vllm_geometry_model.py"), str(geo)],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = tmp_path / "bad"
    file = corrupt(geo, bad, "layers.1.hc_ffn_fn", 11, float("inf"))
    res = load_native(str(bad), device="cpu")
    line = (f"layers.1.hc_ffn_fn in {file}: 1 non-finite value (0 NaN, 1 Inf), first at flat index 11 (inf) "
            "(expected finite F32 values)")
    errors = res.reports["target"].errors
    assert len(errors) == 1 and errors[0].endswith(f"TensorValueError: {line}"), errors



def test_verify_values_reads_nothing_when_the_headers_fail(tmp_path, capsys, monkeypatch):
    path = make_checkpoint(tmp_path / "missing", edit=lambda t: t.pop("layers.0.attn_norm.weight"))
    from vllm_deepseek_v4.loader import stream
    monkeypatch.setattr(stream.PositionalReader, "_read", lambda *a: pytest.fail("read a tensor"))
    assert dsv4(["verify", "--values", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert "layers.0.attn_norm.weight: missing" in out[0]
    assert out[-1] == f"{path}: values not read: the header problems above come first"


@pytest.mark.parametrize("kind", ["e4m3", "e4m3_scale", "e8m0"])
def test_byte_code_checks_agree_on_contiguous_and_strided_tensors(kind):
    """Contiguous tensors are searched with memchr, strided ones with torch reductions: same verdicts, and the
    exact mask (``_bad``) marks exactly the byte the fast test objects to."""
    from vllm_deepseek_v4.loader.values import ValueCheck
    vc = ValueCheck(kind, "x", "f", "x", (6, 5), (), "", 0)
    dtype = torch.float8_e8m0fnu if kind == "e8m0" else torch.float8_e4m3fn
    allowed = {"e4m3": {0x80, 0xB8}, "e4m3_scale": set(), "e8m0": {0x7F, 0x80, 0xB8}}[kind]
    for bad in (None, 0x7F, 0x80, 0xB8, 0xFF):
        u = torch.full((6, 5), 0x10, dtype=torch.uint8)
        if bad is not None:
            u[4, 3] = bad
        t = u.view(dtype)
        want = bad is None or bad in allowed
        assert vc.fine(t) is want and vc.fine(t.t()) is want, (kind, bad)
        assert int(vc._bad(t).sum()) == (0 if want else 1), (kind, bad)
