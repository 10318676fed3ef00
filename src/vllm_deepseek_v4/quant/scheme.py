"""One :class:`Scheme` record per quant format: the facts every reader of a format shares.

Detection (``quant/detect.py``), ``QLinear``'s parameter specs (``model/linear.py``), the decoders
(``quant/<format>.py``), TP sharding's block alignment (``loader/sharding.py``), the MoE kernels' weight tables
(``kernels/moe_layout.py``) and the ``quantization_config`` cross-check all read the record instead of
restating roles, dtypes or block sizes. Standard library only: planning (``dsv4 inspect``) never imports torch,
so dtypes are safetensors names here; torch-using modules map them (``quant/_parts.py``).

A module's weight is a logical ``[out, in]`` matrix stored as a few *roles*; each role's stored shape follows
from ``[out, in]`` through its :class:`Role` kind and the scheme's ``pack`` / ``block_out`` / ``block_in``
(``docs/checkpoint-formats.md §6``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["Role", "Scheme", "SCHEMES", "cdiv", "CODES", "SCALES", "ZEROS", "GLOBAL", "SHAPE", "FLOAT"]

# Role kinds: how a role's stored shape follows from the logical [out, in].
CODES = "codes"      # the weight codes: [out, in / pack]
SCALES = "scales"    # one scale per block: [out / block_out, in / block_in]
ZEROS = "zeros"      # w4a16 zero points: int4 packed along out, one per group: [out / pack, in / group]
GLOBAL = "global"    # one float32 for the whole module: [1] (or [] on disk)
SHAPE = "shape"      # w4a16 weight_shape: the logical [out, in] itself, [2]
FLOAT = "float"      # Role.alloc: the module's float dtype (bf16 weights, w4a16 scales)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers: the number of (edge-cropped) blocks of ``b`` covering ``a``."""
    return -(-a // b)


@dataclass(frozen=True)
class Role:
    """One tensor of a quantized module, under its canonical name (the loader renames on-disk suffixes to it).

    ``dtypes``: the safetensors dtypes the role may have, in message order; the decoders check every role,
    detection the ones that tell formats apart.
    ``disk``: the on-disk suffixes that fill it, in the order detection prefers them (default: its name).
    ``alloc``: what a freshly built ``QLinear`` allocates (a safetensors dtype, or ``FLOAT``); ``None``: only
    the loader registers it (optional roles, the ModelOpt global).
    """

    name: str
    kind: str
    dtypes: tuple[str, ...]
    required: bool = True
    alloc: str | None = None
    disk: tuple[str, ...] = ()

    @property
    def suffixes(self) -> tuple[str, ...]:
        return self.disk or (self.name,)


@dataclass(frozen=True)
class Scheme:
    """A quant format: its roles and how they tile the logical ``[out, in]`` weight.

    ``pack``: codes per stored weight element along ``in`` (fp4: 2 per byte, int4: 8 per int32).
    ``block_out`` / ``block_in``: logical rows / columns one scale covers (w4a16: ``block_in`` is the default
    group; ``group_on_disk`` says the real one is read off ``weight_scale``'s shape).
    ``whole_blocks``: ``in`` must be a multiple of ``block_in`` (fp4 formats cannot crop a partial group).
    ``scale`` / ``scale_encoding``: the per-block scale role and how its value is read: ``"dtype"`` (by its
    dtype: e8m0 bytes are ``2^(e-127)``, floats are values), ``"e8m0"`` (biased exponent bytes, F8_E8M0 or U8),
    ``"e4m3/global"`` (e4m3 local scale combined with one of ``globals``), ``"float"`` (a float multiplier).
    ``globals``: global-scale role -> how it combines with the local scale; a module holds exactly one
    (compressed-tensors stores the divisor, ModelOpt its inverse and multiplies: ``§6.3`` / ``§6.7``).
    ``ct_weights`` / ``ct_format`` / ``methods``: how a ``quantization_config`` declares the format
    (compressed-tensors ``weights.num_bits``/``type`` or ``format``; ``quant_method`` values).
    """

    name: str
    roles: tuple[Role, ...]
    pack: int = 1
    block_out: int = 1
    block_in: int = 1
    whole_blocks: bool = False
    group_on_disk: bool = False
    scale: str | None = None
    scale_encoding: str = "none"
    globals: tuple[tuple[str, str], ...] = ()
    ct_weights: tuple[int, str] | None = None
    ct_format: str | None = None
    methods: tuple[str, ...] = ()
    _by_name: dict[str, Role] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {r.name: r for r in self.roles})

    # ---- roles ----
    def role(self, name: str) -> Role:
        return self._by_name[name]

    def has(self, name: str) -> bool:
        return name in self._by_name

    @property
    def required(self) -> frozenset[str]:
        return frozenset(r.name for r in self.roles if r.required)

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def global_op(self, role: str) -> str | None:
        """``"divide"`` / ``"multiply"`` for a global-scale role, else None."""
        return dict(self.globals).get(role)

    # ---- shapes ----
    def block(self, role: str, *, group: int | None = None) -> tuple[int, int] | None:
        """Logical elements per stored element of ``role`` along ``(out, in)``; None: not tiled by the weight.

        ``group`` overrides ``block_in`` for schemes whose group is read off disk (w4a16)."""
        kind = self.role(role).kind
        g = group if group is not None and self.group_on_disk else self.block_in
        if kind == CODES:
            return (1, self.pack)
        if kind == SCALES:
            return (self.block_out, g)
        if kind == ZEROS:
            return (self.pack, g)
        return None

    def shape(self, role: str, out_features: int, in_features: int, *, group: int | None = None) -> tuple[int, ...]:
        """The stored shape of ``role`` for a logical ``[out, in]`` weight (edge blocks cropped: ``cdiv``).

        ``whole_blocks`` formats cannot crop along ``in``: callers check that ``in`` is a multiple of
        ``block_in``; the width here is then ``in // block`` (what a message shows when it is not)."""
        b = self.block(role, group=group)
        if b is not None:
            cols = in_features // b[1] if self.whole_blocks else cdiv(in_features, b[1])
            return (cdiv(out_features, b[0]), cols)
        return (2,) if self.role(role).kind == SHAPE else (1,)


_FLOATS = ("BF16", "F16", "F32", "F64")
_CT_GLOBAL = "weight_global_scale"      # compressed-tensors: W = fp4 * (local / global)
_MO_GLOBAL = "weight_scale_2"           # ModelOpt: W = fp4 * local * scale_2 (= 1 / global)

SCHEMES: Final[dict[str, Scheme]] = {s.name: s for s in (
    Scheme("bf16", (Role("weight", CODES, _FLOATS, alloc=FLOAT),)),
    # §6.1 / §6.4: e4m3 codes, one multiplier per 128x128 block (e8m0 Flash/Pro, F32 Flash-Base and
    # DeepSeek-V3 weight_scale_inv, BF16 compressed-tensors FP8_BLOCK); edge blocks are cropped
    Scheme("fp8_block",
           (Role("weight", CODES, ("F8_E4M3",), alloc="F8_E4M3"),
            Role("scale", SCALES, ("F8_E8M0", "F32", "BF16", "F16"), alloc="F8_E8M0",      # F16: read by value
                 disk=("scale", "weight_scale_inv", "weight_scale"))),
           block_out=128, block_in=128, scale="scale", scale_encoding="dtype", ct_weights=(8, "float"),
           methods=("fp8",)),
    # §6.2 / §6.5: e2m1 codes two per byte (low nibble first), one power of two per 32 inputs (OCP MX k = 32)
    Scheme("mxfp4",
           (Role("weight", CODES, ("I8", "U8"), alloc="I8", disk=("weight", "weight_packed")),
            Role("scale", SCALES, ("F8_E8M0", "U8"), alloc="F8_E8M0", disk=("scale", "weight_scale"))),
           pack=2, block_in=32, whole_blocks=True, scale="scale", scale_encoding="e8m0", ct_format="mxfp4"),
    # §6.3 / §6.7: e2m1 codes, one e4m3 scale per 16 inputs and one F32 global (divisor or multiplier)
    Scheme("nvfp4",
           (Role("weight", CODES, ("U8", "I8"), alloc="U8", disk=("weight", "weight_packed")),   # I8: same bits
            Role("weight_scale", SCALES, ("F8_E4M3",), alloc="F8_E4M3"),
            Role(_CT_GLOBAL, GLOBAL, ("F32",), required=False, alloc="F32"),
            Role(_MO_GLOBAL, GLOBAL, ("F32",), required=False),
            Role("input_global_scale", GLOBAL, ("F32",), required=False),
            Role("input_scale", GLOBAL, ("F32",), required=False)),
           pack=2, block_in=16, whole_blocks=True, scale="weight_scale", scale_encoding="e4m3/global",
           globals=((_CT_GLOBAL, "divide"), (_MO_GLOBAL, "multiply")), ct_weights=(4, "float"),
           methods=("modelopt", "modelopt_fp4")),
    # §6.6: int4 offset-coded eight per int32 (rows padded), float scales per group (32 by default; any
    # group dividing ``in`` is read off the scale's shape), optional int4 zero points packed along out
    Scheme("w4a16",
           (Role("weight_packed", CODES, ("I32",), alloc="I32"),
            Role("weight_scale", SCALES, ("BF16", "F16", "F32"), alloc=FLOAT),
            Role("weight_shape", SHAPE, ("I64", "I32"), required=False, alloc="I64"),
            Role("weight_zero_point", ZEROS, ("I32",), required=False)),
           pack=8, block_in=32, group_on_disk=True, scale="weight_scale", scale_encoding="float",
           ct_weights=(4, "int")),
)}
