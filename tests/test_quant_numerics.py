"""Numerics of every quant scheme: exact decodes of hand-built parts, round trips, error bounds, odd shapes, and
bit-exact checks against independent implementations (compressed-tensors 0.17, transformers 5.19) where they exist.

Tolerances: where the math is exact (power-of-two scales, values on the grid, a single final rounding) we compare
with ``torch.equal``; otherwise the bound is the format's own rounding step, derived in each test.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_deepseek_v4.errors import QuantMismatchError, TensorDtypeError, TensorShapeError
from vllm_deepseek_v4.quant import fp8_block, mxfp4, numerics, nvfp4, w4a16
from vllm_deepseek_v4.quant.e8m0 import e8m0_to_float, float_to_e8m0
from vllm_deepseek_v4.quant.fp4 import E2M1_GRID, e2m1_encode, pack_fp4, unpack_fp4, unpack_fp4_values

FEW = settings(deadline=None, max_examples=20)  # derandomize comes from the CI profile (tests/conftest.py)
ODD_OUT = st.sampled_from([1, 7, 129, 200])
GRID = torch.tensor(E2M1_GRID)


def rand_w(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Normal weights with no exact zeros (a zero would hide sign and scale bugs)."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return torch.where(w == 0, torch.ones_like(w), w)


def rand_e2m1_values(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    codes = torch.randint(0, 16, (out_features, in_features), generator=torch.Generator().manual_seed(seed))
    return GRID[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)


def nearest_grid_error(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Distance from ``x`` to the nearest representable ``+-E2M1_GRID * step`` (brute force over the grid)."""
    grid = torch.cat([GRID, -GRID]) * step.unsqueeze(-1)
    return (x.unsqueeze(-1) - grid).abs().amin(dim=-1)


# ---------------------------------------------------------------------------------------------- e8m0 and e2m1

def test_e8m0_decodes_every_byte_as_power_of_two_and_255_as_nan() -> None:
    byte = torch.arange(256, dtype=torch.uint8)
    for stored in (byte, byte.view(torch.float8_e8m0fnu)):
        got = e8m0_to_float(stored)
        assert torch.equal(got[:255], torch.tensor([2.0 ** (e - 127) for e in range(255)], dtype=torch.float32))
        assert torch.isnan(got[255])


def test_float_to_e8m0_rounds_up_to_power_of_two_without_flushing() -> None:
    got = float_to_e8m0(torch.tensor([3.0, 0.75, 1.0, 2.0**-20, 2.0**-127]), dtype=torch.uint8)
    assert got.tolist() == [129, 127, 127, 107, 0]


def test_float_to_e8m0_exact_rejects_non_power_of_two() -> None:
    msg = "s: expected powers of two, found 3.0. use rounding=\"up\" to round scales up to the next power of two"
    with pytest.raises(QuantMismatchError, match=f"^{re.escape(msg)}$"):
        float_to_e8m0(torch.tensor([4.0, 3.0]), rounding="exact", name="s")


def test_e2m1_encode_rounds_ties_to_even_and_saturates() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, -0.1, -2.9, 0.2600])
    got = unpack_fp4_values(pack_fp4(e2m1_encode(x)))
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -3.0, 0.5]
    assert e2m1_encode(torch.tensor([-0.1])).item() == 8  # sign kept on a negative zero, as compressed-tensors does


def test_fp4_low_nibble_is_first_column() -> None:
    byte = torch.tensor([[0x21]], dtype=torch.uint8)
    assert unpack_fp4_values(byte).tolist() == [[0.5, 1.0]]
    assert unpack_fp4_values(byte.view(torch.int8)).tolist() == [[0.5, 1.0]]


@FEW
@given(out_features=ODD_OUT, half_in=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_fp4_pack_unpack_round_trips_every_code(out_features: int, half_in: int, seed: int) -> None:
    codes = torch.randint(0, 16, (out_features, 2 * half_in), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    packed = pack_fp4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (out_features, half_in)
    assert torch.equal(unpack_fp4(packed), codes)


# ---------------------------------------------------------------------------------------------- fp8_block

@FEW
@given(out_features=ODD_OUT, in_features=st.sampled_from([1, 100, 128, 300]), seed=st.integers(0, 2**16))
def test_fp8_block_e8m0_round_trip_is_exact_on_grid(out_features: int, in_features: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    byte = torch.randint(0, 256, (out_features, in_features), dtype=torch.uint8, generator=gen)
    byte = torch.where((byte & 0x7F) == 0x7F, torch.full_like(byte, 0x38), byte)  # drop the e4m3 NaNs
    exps = torch.randint(-30, 10, (-(-out_features // 128), -(-in_features // 128)), generator=gen)
    w = byte.view(torch.float8_e4m3fn).float() * fp8_block._expand(torch.ldexp(torch.ones(exps.shape), exps),
                                                                    out_features, in_features)
    parts = fp8_block.quantize(w, scale_dtype="e8m0")
    assert parts["weight"].dtype == torch.float8_e4m3fn and parts["scale"].dtype == torch.float8_e8m0fnu
    assert torch.equal(fp8_block.dequantize(parts, out_features, in_features), w)


@pytest.mark.parametrize("scale_dtype", ["e8m0", "f32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (129, 300), (256, 128), (200, 1000)])
def test_fp8_block_quantize_error_is_within_half_an_e4m3_step(scale_dtype: str, shape: tuple[int, int]) -> None:
    w = rand_w(*shape) * 3.0
    parts = fp8_block.quantize(w, scale_dtype=scale_dtype)  # type: ignore[arg-type]
    scale = fp8_block._expand(fp8_block.scale_to_float(parts["scale"]), *shape)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale for subnormals
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10)
    assert ((fp8_block.dequantize(parts, *shape) - w).abs() <= bound).all()
    assert (parts["weight"].float().abs() <= fp8_block.FP8_MAX).all()


def test_fp8_block_decode_crops_edge_blocks_and_keeps_tiny_e8m0_scales() -> None:
    scale = float_to_e8m0(torch.tensor([[2.0**-20, 2.0], [0.5, 2.0**-7]]))
    parts = {"weight": torch.ones(130, 129).to(torch.float8_e4m3fn), "scale": scale}
    for dtype in (torch.float32, torch.bfloat16):
        got = fp8_block.dequantize(parts, 130, 129, dtype)
        assert got.dtype == dtype
        assert [got[0, 0].item(), got[0, 128].item(), got[129, 0].item(), got[129, 128].item()] == \
            [2.0**-20, 2.0, 0.5, 2.0**-7]


def test_fp8_block_wrong_scale_shape_names_tensor() -> None:
    parts = {"weight": torch.zeros(130, 129).to(torch.float8_e4m3fn), "scale": torch.ones(1, 2)}
    msg = "attn.wq_a.scale: expected [2, 2], found [1, 2]. fp8_block shapes follow from the logical weight shape"
    with pytest.raises(TensorShapeError, match=f"^{re.escape(msg)}$"):
        fp8_block.dequantize(parts, 130, 129, name="attn.wq_a")


# ---------------------------------------------------------------------------------------------- mxfp4

@FEW
@given(out_features=ODD_OUT, groups=st.integers(1, 5), seed=st.integers(0, 2**16),
       flavor=st.sampled_from(["deepseek", "compressed-tensors"]))
def test_mxfp4_round_trip_is_exact_on_grid(out_features: int, groups: int, seed: int, flavor: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    exps = torch.randint(-40, 20, (out_features, groups), generator=gen)
    w = rand_e2m1_values(out_features, 32 * groups, seed) * torch.ldexp(torch.ones(exps.shape), exps) \
        .repeat_interleave(32, dim=1)
    parts = mxfp4.quantize(w, flavor=flavor)  # type: ignore[arg-type]
    assert parts["weight"].shape == (out_features, 16 * groups) and parts["scale"].shape == (out_features, groups)
    assert torch.equal(mxfp4.dequantize(parts, out_features, 32 * groups), w)


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (129, 64)])
def test_mxfp4_quantize_picks_the_nearest_value_without_saturating(shape: tuple[int, int]) -> None:
    w = rand_w(*shape)
    parts = mxfp4.quantize(w)
    step = e8m0_to_float(parts["scale"]).repeat_interleave(32, dim=1)
    assert (w.abs() <= 6 * step).all()  # the scale never clips
    err = (mxfp4.dequantize(parts, *shape) - w).abs()
    assert torch.equal(err, nearest_grid_error(w, step))


def test_mxfp4_flavors_store_the_same_bits() -> None:
    w = rand_w(5, 64)
    ds, ct = mxfp4.quantize(w, flavor="deepseek"), mxfp4.quantize(w, flavor="compressed-tensors")
    assert (ds["weight"].dtype, ds["scale"].dtype, ct["weight"].dtype, ct["scale"].dtype) == \
        (torch.int8, torch.float8_e8m0fnu, torch.uint8, torch.uint8)
    assert torch.equal(ds["weight"].view(torch.uint8), ct["weight"])
    assert torch.equal(ds["scale"].view(torch.uint8), ct["scale"])


def test_mxfp4_decodes_hand_built_byte_with_tiny_scale() -> None:
    parts = {"weight": torch.full((1, 16), 0x21, dtype=torch.uint8).view(torch.int8),
             "scale": torch.tensor([[107]], dtype=torch.uint8).view(torch.float8_e8m0fnu)}
    for dtype in (torch.float32, torch.bfloat16):
        got = mxfp4.dequantize(parts, 1, 32, dtype)
        assert got[0, :2].tolist() == [0.5 * 2.0**-20, 2.0**-20]


def test_mxfp4_rejects_in_features_not_multiple_of_32() -> None:
    msg = "mxfp4 input: expected in_features a multiple of 32, found 48. MXFP4 keeps one scale per 32 input columns"
    with pytest.raises(TensorShapeError, match=f"^{re.escape(msg)}$"):
        mxfp4.quantize(rand_w(2, 48))


# ---------------------------------------------------------------------------------------------- nvfp4

def _nvfp4_hand_parts() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    codes = torch.arange(32, dtype=torch.uint8).reshape(1, 32) % 16
    local = torch.tensor([[1.5, 2.0**-9]]).to(torch.float8_e4m3fn)  # 2^-9: the smallest e4m3 subnormal
    expected = unpack_fp4_values(pack_fp4(codes)) * local.float().repeat_interleave(16, dim=1) * 2.0**-4
    return {"weight": pack_fp4(codes), "weight_scale": local}, expected


@pytest.mark.parametrize("role, value", [("weight_global_scale", torch.tensor([16.0])),
                                         ("weight_global_scale", torch.tensor(16.0)),
                                         ("weight_scale_2", torch.tensor(2.0**-4))])
def test_nvfp4_decodes_hand_built_parts_exactly(role: str, value: torch.Tensor) -> None:
    parts, expected = _nvfp4_hand_parts()
    assert torch.equal(nvfp4.dequantize({**parts, role: value}, 1, 32), expected)


def test_nvfp4_with_both_global_scales_is_an_error() -> None:
    parts, _ = _nvfp4_hand_parts()
    parts |= {"weight_global_scale": torch.tensor([16.0]), "weight_scale_2": torch.tensor(2.0**-4)}
    msg = ("x.weight_global_scale: expected exactly one of weight_global_scale, weight_scale_2, found "
           "['weight_global_scale', 'weight_scale_2']. compressed-tensors stores the divisor, ModelOpt its inverse; "
           "never both")
    with pytest.raises(QuantMismatchError, match=f"^{re.escape(msg)}$"):
        nvfp4.dequantize(parts, 1, 32, name="x")


@pytest.mark.parametrize("flavor", ["compressed-tensors", "modelopt"])
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (129, 80)])
def test_nvfp4_quantize_picks_the_nearest_value(flavor: str, shape: tuple[int, int]) -> None:
    w = rand_w(*shape)
    parts = nvfp4.quantize(w, flavor=flavor, with_input_scale=True)  # type: ignore[arg-type]
    g = nvfp4.global_scale(w.abs().amax())
    step = (parts["weight_scale"].float() / g).repeat_interleave(16, dim=1)
    codes_err = (unpack_fp4_values(parts["weight"]) * step - w).abs()
    assert torch.equal(codes_err, nearest_grid_error(w, step).to(codes_err.dtype))
    # decode adds one f32 rounding of the effective scale at most
    assert torch.allclose(nvfp4.dequantize(parts, *shape), unpack_fp4_values(parts["weight"]) * step, rtol=2**-22)


def test_nvfp4_flavors_differ_only_in_how_the_global_is_stored() -> None:
    w = rand_w(3, 32)
    ct, mo = nvfp4.quantize(w, with_input_scale=True), nvfp4.quantize(w, flavor="modelopt", with_input_scale=True)
    assert sorted(ct) == ["input_global_scale", "weight", "weight_global_scale", "weight_scale"]
    assert sorted(mo) == ["input_scale", "weight", "weight_scale", "weight_scale_2"]
    assert ct["weight_global_scale"].shape == (1,) and mo["weight_scale_2"].shape == ()
    assert torch.equal(ct["weight"], mo["weight"])
    assert torch.equal(ct["weight_scale"].view(torch.uint8), mo["weight_scale"].view(torch.uint8))
    assert mo["weight_scale_2"].item() == pytest.approx(w.abs().max().item() / (6 * 448), rel=1e-6)


# ---------------------------------------------------------------------------------------------- w4a16

def test_w4a16_first_value_sits_in_bits_0_to_3() -> None:
    word = sum((8 + i) << (4 * i) for i in range(8))  # nibbles 8..15 are the values 0..7
    packed = torch.tensor([[word - 2**32]], dtype=torch.int32)  # the top nibble sets the int32 sign bit
    scale = torch.tensor([[0.5]], dtype=torch.bfloat16)
    got = w4a16.dequantize({"weight_packed": packed, "weight_scale": scale}, 1, 8)
    assert got.tolist() == [[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]]


@FEW
@given(rows=ODD_OUT, n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_w4a16_pack_unpack_round_trips_with_padding(rows: int, n: int, seed: int) -> None:
    q = torch.randint(-8, 8, (rows, n), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    packed = w4a16.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (rows, -(-n // 8))
    assert torch.equal(w4a16.unpack_int4(packed, n), q)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size, shape", [(32, (7, 96)), (128, (129, 256)), (16, (3, 16)), (40, (5, 120))])
def test_w4a16_quantize_error_is_within_half_a_step(symmetric: bool, group_size: int, shape: tuple[int, int]) -> None:
    w = rand_w(*shape)
    parts = w4a16.quantize(w, group_size=group_size, symmetric=symmetric)
    assert parts["weight_shape"].tolist() == list(shape)
    step = parts["weight_scale"].float().repeat_interleave(group_size, dim=1)
    # half a step; the bf16 scale (rounded by up to 2^-8 relative) can push the far end of the 15-step range
    # up to 15 * 2^-8 steps past the clamp
    assert ((w4a16.dequantize(parts, *shape) - w).abs() <= step * (0.5 + 15 * 2.0**-8)).all()


def test_w4a16_weight_shape_disagreeing_with_config_is_an_error() -> None:
    parts = w4a16.quantize(rand_w(4, 32)) | {"weight_shape": torch.tensor([4, 64])}
    msg = "e.weight_shape: expected [4, 32], found [4, 64]. the stored logical shape disagrees with the config"
    with pytest.raises(TensorShapeError, match=f"^{re.escape(msg)}$"):
        w4a16.dequantize(parts, 4, 32, name="e")


# ---------------------------------------------------------------------------------------------- dispatcher

@pytest.mark.parametrize("scheme, opts", [("bf16", {}), ("fp8_block", {"scale_dtype": "f32"}), ("mxfp4", {}),
                                          ("nvfp4", {"flavor": "modelopt"}), ("w4a16", {"group_size": 32})])
def test_dispatcher_round_trips_every_scheme(scheme: str, opts: dict[str, object]) -> None:
    w = rand_w(129, 64)
    got = numerics.dequantize(scheme, numerics.quantize(scheme, w, **opts), 129, 64)
    assert got.dtype == torch.float32 and got.shape == (129, 64)
    assert (got - w).abs().max() <= 0.25 * w.abs().max()  # the coarsest format, fp4, errs by < amax/6
    if scheme == "bf16":
        assert torch.equal(got, w.bfloat16().float())


def test_dispatcher_unknown_scheme_is_a_quant_mismatch() -> None:
    msg = ("m: expected bf16 | fp8_block | mxfp4 | nvfp4 | w4a16, found 'int3'. the scheme comes from quant detection; "
           "this one has no decoder")
    with pytest.raises(QuantMismatchError, match=f"^{re.escape(msg)}$"):
        numerics.dequantize("int3", {}, 1, 1, name="m")


def test_dispatcher_missing_role_is_a_quant_mismatch() -> None:
    msg = ("m.scale: expected fp8_block roles ['scale', 'weight'], found roles ['weight']. missing ['scale']: "
           "a fp8_block weight cannot be decoded without them")
    with pytest.raises(QuantMismatchError, match=f"^{re.escape(msg)}$"):
        numerics.dequantize("fp8_block", {"weight": torch.zeros(1, 1).to(torch.float8_e4m3fn)}, 1, 1, name="m")


def test_dispatcher_unexpected_role_is_a_quant_mismatch() -> None:
    parts = mxfp4.quantize(rand_w(1, 32)) | {"weight_scale_2": torch.tensor(1.0)}
    with pytest.raises(QuantMismatchError, match=r"^m\.weight_scale_2: .* unexpected \['weight_scale_2'\]"):
        numerics.dequantize("mxfp4", parts, 1, 32, name="m")


def test_dispatcher_bf16_rejects_a_quantized_weight() -> None:
    msg = ("m.weight: expected bfloat16 | float16 | float32, found torch.float8_e4m3fn. a quantized weight needs its "
           "scheme's scales to decode")
    with pytest.raises(TensorDtypeError, match=f"^{re.escape(msg)}$"):
        numerics.dequantize("bf16", {"weight": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, 2, 2, name="m")


def test_dispatcher_rejects_wrong_role_dtype() -> None:
    parts = {"weight": torch.zeros(1, 16, dtype=torch.int8), "scale": torch.ones(1, 1)}
    with pytest.raises(TensorDtypeError, match=r"^scale: expected torch.float8_e8m0fnu \| torch.uint8, found "):
        numerics.dequantize("mxfp4", parts, 1, 32)


# ---------------------------------------------------------------------------------------------- peers
# compressed-tensors 0.17 and transformers 5.19 (the `peers` extra). Each test skips where its peer is absent.

def _ct_scheme(preset: str, **weights: object) -> object:
    qs = pytest.importorskip("compressed_tensors.quantization")
    presets = pytest.importorskip("compressed_tensors.quantization.quant_scheme").PRESET_SCHEMES
    args = presets[preset]["weights"].model_copy(update=weights)
    return qs.QuantizationScheme(targets=["Linear"], weights=args)


def _group_minmax(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = w.reshape(w.shape[0], -1, group)
    return g.amin(-1), g.amax(-1)


def test_fp4_packing_matches_compressed_tensors() -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    x = torch.cat([rand_w(129, 64) * 3, rand_e2m1_values(129, 64)], dim=1)
    assert torch.equal(pack_fp4(e2m1_encode(x)), ct.pack_fp4_to_uint8(x))
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(unpack_fp4_values(every_byte), ct.unpack_fp4_from_uint8(every_byte, 16, 32, torch.float32))


@pytest.mark.parametrize("shape", [(1, 16), (129, 80)])
def test_nvfp4_quantize_matches_compressed_tensors_bit_for_bit(shape: tuple[int, int]) -> None:
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    w, scheme = rand_w(*shape), _ct_scheme("NVFP4A16")
    g = helpers.generate_gparam(w.min(), w.max())
    scale, _ = helpers.calculate_qparams(*_group_minmax(w, 16), scheme.weights, global_scale=g)
    with torch.compiler.set_stance("force_eager"):  # its e2m1 rounding is torch.compile'd; eager gives the same
        theirs = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, scheme)
    ours = nvfp4.quantize(w)
    assert torch.equal(ours["weight"], theirs["weight_packed"])
    assert torch.equal(ours["weight_scale"].view(torch.uint8), theirs["weight_scale"].view(torch.uint8))
    assert torch.equal(ours["weight_global_scale"], theirs["weight_global_scale"])
    # computed in f32, returned as bf16 (or left f32 when a row is one group: it then infers "channel")
    decoded = NVFP4PackedCompressor.decompress(theirs, scheme)["weight"].to(torch.bfloat16)
    assert torch.equal(nvfp4.dequantize(ours, *shape, torch.bfloat16), decoded)


def test_modelopt_nvfp4_converted_by_compressed_tensors_decodes_the_same() -> None:
    conv = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4")
    mo = nvfp4.quantize(rand_w(7, 48), flavor="modelopt", with_input_scale=True)
    tensors = conv.ModelOptNvfp4Converter(targets=["re:.*proj"]).process({f"m.proj.{k}": v for k, v in mo.items()})
    ct = {k.removeprefix("m.proj."): v for k, v in tensors.items()}
    assert sorted(ct) == ["input_global_scale", "weight_global_scale", "weight_packed", "weight_scale"]
    ct["weight"] = ct.pop("weight_packed")
    del ct["input_global_scale"]
    # 1 / (1 / g) and the two operation orders each round once in f32
    assert torch.allclose(nvfp4.dequantize(ct, 7, 48), nvfp4.dequantize(mo, 7, 48), rtol=2**-21, atol=0)


def test_mxfp4_dequantize_matches_compressed_tensors() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    exps = torch.randint(-60, 20, (129, 3), generator=torch.Generator().manual_seed(1))
    w = rand_e2m1_values(129, 96) * torch.ldexp(torch.ones(exps.shape), exps).repeat_interleave(32, dim=1)
    ours = mxfp4.quantize(w, flavor="compressed-tensors")
    theirs = MXFP4PackedCompressor.decompress({"weight_packed": ours["weight"], "weight_scale": ours["scale"]},
                                               _ct_scheme("MXFP4A16"))["weight"]
    assert torch.equal(mxfp4.dequantize(ours, 129, 96, torch.bfloat16), theirs)


@pytest.mark.parametrize("n", [8, 13, 64])
def test_int4_packing_matches_compressed_tensors(n: int) -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (9, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(w4a16.pack_int4(q), ct.pack_to_int32(q, 4))
    assert torch.equal(w4a16.unpack_int4(ct.pack_to_int32(q, 4), n), ct.unpack_from_int32(ct.pack_to_int32(q, 4), 4,
                                                                                         torch.Size([9, n])))
    assert torch.equal(w4a16.pack_int4(q.T).T, ct.pack_to_int32(q, 4, packed_dim=0))  # zero points: along out


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_quantize_and_decode_match_compressed_tensors(symmetric: bool) -> None:
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    w, scheme = rand_w(129, 96), _ct_scheme("W4A16" if symmetric else "W4A16_ASYM", group_size=32)
    scale, zp = helpers.calculate_qparams(*_group_minmax(w, 32), scheme.weights)
    theirs = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
    ours = w4a16.quantize(w, group_size=32, symmetric=symmetric, scale_dtype=torch.float32)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours["weight_scale"] = ours["weight_scale"].bfloat16()  # decode with a bf16 scale: one rounding on both sides
    decoded = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert torch.equal(w4a16.dequantize(ours, 129, 96, torch.bfloat16), decoded)


@pytest.mark.parametrize("scale_dtype", ["e8m0", "f32"])
@pytest.mark.parametrize("shape", [(129, 300), (256, 128)])
def test_fp8_block_dequantize_matches_compressed_tensors(scale_dtype: str, shape: tuple[int, int]) -> None:
    conv = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer")
    parts = fp8_block.quantize(rand_w(*shape) * 100, scale_dtype=scale_dtype)  # type: ignore[arg-type]
    theirs = conv.FP8BlockDequantizer(dtype=torch.float32)._create_dequantized_weight(parts["weight"], parts["scale"])
    assert torch.equal(fp8_block.dequantize(parts, *shape), theirs)


@pytest.mark.parametrize("shape", [(129, 300), (256, 128)])
def test_fp8_block_f32_quantize_matches_compressed_tensors(shape: tuple[int, int]) -> None:
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.quantization.lifecycle.forward import quantize
    w, scheme = rand_w(*shape), _ct_scheme("FP8_BLOCK")
    pad = torch.nn.functional.pad(w, (0, -shape[1] % 128, 0, -shape[0] % 128))
    blocks = pad.reshape(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128)
    scale, _ = helpers.calculate_qparams(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), scheme.weights)
    theirs = quantize(w, scale, None, scheme.weights, dtype=torch.float8_e4m3fn)
    ours = fp8_block.quantize(w, scale_dtype="f32")
    assert torch.equal(ours["scale"], scale)
    assert torch.equal(ours["weight"].view(torch.uint8), theirs.view(torch.uint8))


def _hf_fp8(scale_fmt: str | None = None) -> SimpleNamespace:
    pytest.importorskip("transformers")
    config = SimpleNamespace(weight_block_size=(128, 128), scale_fmt=scale_fmt)
    return SimpleNamespace(quantization_config=config)


@pytest.mark.parametrize("scale_dtype", ["e8m0", "f32"])
def test_fp8_block_dequantize_matches_transformers(scale_dtype: str) -> None:
    quantizer = _hf_fp8()
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    parts = fp8_block.quantize(rand_w(256, 384) * 2.0**-12, scale_dtype=scale_dtype)  # type: ignore[arg-type]
    theirs = Fp8Dequantize(quantizer)._dequantize_one(parts["weight"], parts["scale"], output_dtype=torch.float32)
    assert torch.equal(fp8_block.dequantize(parts, 256, 384), theirs)


def test_mxfp4_dequantize_matches_transformers() -> None:
    quantizer = _hf_fp8()
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    exps = torch.randint(-60, 20, (7, 4), generator=torch.Generator().manual_seed(2))
    w = rand_e2m1_values(7, 128) * torch.ldexp(torch.ones(exps.shape), exps).repeat_interleave(32, dim=1)
    parts = mxfp4.quantize(w)  # DeepSeek flavor: int8 codes, float8_e8m0fnu scales
    theirs = Fp8Dequantize(quantizer)._dequantize_one(parts["weight"], parts["scale"], output_dtype=torch.float32)
    assert torch.equal(mxfp4.dequantize(parts, 7, 128), theirs)


def test_fp8_block_e8m0_quantize_matches_transformers_bit_for_bit() -> None:
    quantizer = _hf_fp8("ue8m0")
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    w = rand_w(256, 384) * 5
    theirs = Fp8Quantize(quantizer)._quantize_one("m.weight", w)
    ours = fp8_block.quantize(w, scale_dtype="e8m0")
    assert torch.equal(ours["weight"].view(torch.uint8), theirs["m.weight"].view(torch.uint8))
    assert torch.equal(ours["scale"].view(torch.uint8), theirs["m.weight_scale_inv"].view(torch.uint8))
