"""The format registry: what each quantized operand format is, by name (no torch import: the config schema,
the dry run's memory estimate and preflight read it).

A format is its element type, the block its scale covers, its scale rule and which kernels implement it.
quantize.py looks the scale rule up to quantize, encode and decode (quantize.SCHEMES); the Megatron engine's
emulated path runs the Triton kernels where `triton` is set and the torch reference otherwise
(emulate.fake_quantize_2d); te_recipes.py picks Megatron's FP4 or FP8 autocast from `element_bits`.
Adding a format = one register_format() call here (plus a scale rule in scaling.py/quantize.py if it
brings a new one), a precision config, and tests.
"""

from dataclasses import dataclass

# Bits per element of each element type (formats.py holds their grids).
ELEMENT_BITS = {"e4m3": 8, "e5m2": 8, "e2m1": 4}


@dataclass(frozen=True)
class FormatSpec:
    name: str
    element: str  # element type: e4m3 | e5m2 | e2m1 (formats.ELEMENTS)
    block: int | None  # elements sharing one scale along the GEMM's reduction dimension; None: per tensor
    scale: str  # scale rule (quantize.SCHEMES): fp32_tensor | e8m0_te | e8m0_ocp | nvfp4
    bytes_per_element: float  # element plus its share of the scales (config/estimate.py's memory estimate)
    triton: bool = False  # the Triton fake-quantize kernels implement it bit for bit (triton_kernels.py)

    @property
    def element_bits(self) -> int:
        return ELEMENT_BITS[self.element]

    @property
    def blocked(self) -> bool:
        """Block scales, hence 2-D tiles (block x block) are possible too."""
        return self.block is not None


FORMATS: dict[str, FormatSpec] = {}


def register_format(spec: FormatSpec) -> FormatSpec:
    if spec.name in FORMATS or spec.name == "bf16":
        raise ValueError(f"format {spec.name!r} is already registered")
    if spec.element not in ELEMENT_BITS:
        raise ValueError(f"format {spec.name!r}: unknown element type {spec.element!r}")
    FORMATS[spec.name] = spec
    return spec


def get_format(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"fmt={name!r}: allowed values are {', '.join(FORMATS)}") from None


def blocked_formats() -> tuple[str, ...]:
    """Formats with block scales (the ones that take 2-D blocks)."""
    return tuple(n for n, f in FORMATS.items() if f.blocked)


# Per-tensor FP8 current scaling (TE's Float8CurrentScaling): scale = fp8 max / amax, FP32.
register_format(FormatSpec("fp8_e4m3", "e4m3", None, "fp32_tensor", 1.0, triton=True))
register_format(FormatSpec("fp8_e5m2", "e5m2", None, "fp32_tensor", 1.0, triton=True))
# TE's MXFP8BlockScaling: E4M3 elements, an E8M0 scale per 32 rounded up so that no element saturates.
register_format(FormatSpec("mxfp8", "e4m3", 32, "e8m0_te", 1.03, triton=True))
# TE's NVFP4BlockScaling: E2M1 elements, an E4M3 scale per 16 and an FP32 tensor scale.
register_format(FormatSpec("nvfp4", "e2m1", 16, "nvfp4", 0.5625, triton=True))
# OCP MXFP4 (Microscaling spec v1.0): E2M1 elements, an E8M0 scale per 32 from floor(log2(amax)) - 2.
# Emulated with the torch quantizer only (no Triton kernel): see emulate.py.
register_format(FormatSpec("mxfp4", "e2m1", 32, "e8m0_ocp", 0.5 + 1 / 32))
