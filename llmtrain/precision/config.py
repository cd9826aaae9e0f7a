"""The precision recipe as config: what the `precision/*.yaml` group fills in.

Only the schema lives here; the numerics live in the other modules of this package.
"""

from dataclasses import dataclass, field

PRECISION_NAMES = ["bf16", "fp8_cs", "mxfp8", "nvfp4", "nvfp4_fp4all"]
BACKENDS = ["auto", "native", "custom", "torch"]


@dataclass
class BF16Layers:
    """Transformer layers kept in BF16 (not quantized), counted from either end."""

    first: int = 0
    last: int = 0


@dataclass
class MonitorConfig:
    """sqrt(3) rule monitor: gradient norm vs quantization noise, every `interval` steps."""

    enabled: bool = False
    interval: int = 100
    threshold: float = 1.7320508075688772


@dataclass
class QAFConfig:
    """Quantization-aware finetuning switch: forward stays quantized, backward/update go to BF16."""

    trigger: str = "off"  # off | sqrt3 | fraction
    patience: int = 3  # sqrt3: consecutive monitor checks below the threshold before switching
    fraction: float = 0.9  # fraction: of train.steps after which to switch


@dataclass
class PrecisionConfig:
    name: str = "bf16"
    backend: str = "auto"
    # Element formats per operand role: bf16 | fp8_e4m3 | fp8_e5m2 | mxfp8 | nvfp4
    weight_format: str = "bf16"
    activation_format: str = "bf16"
    grad_format: str = "bf16"
    # Which GEMMs are quantized (the others run in high precision).
    quantize_fprop: bool = True
    quantize_dgrad: bool = True
    quantize_wgrad: bool = True
    weight_block_2d: bool = False  # NVFP4 16x16 weight tiles so W and W^T see the same values
    rht: bool = False  # random Hadamard transform on both wgrad operands (along the token dimension)
    rht_size: int = 16
    rht_signs: str = "te"  # te: TE's fixed sign vector | random: per-layer signs drawn from the seed
    # Rounding per GEMM: nearest | stochastic. fprop_rounding applies to x and W; dgrad_/wgrad_rounding to
    # the gradient operand, and also to W (dgrad) / x (wgrad) when sr_operands=all.
    fprop_rounding: str = "nearest"
    dgrad_rounding: str = "nearest"
    wgrad_rounding: str = "nearest"
    sr_operands: str = "grad"  # grad | all
    sr_bits: int = 8  # [prec-num] random bits per element in SR: 8 = native TE (cvt.rs), 24 = unbiased
    bf16_layers: BF16Layers = field(default_factory=BF16Layers)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    qaf: QAFConfig = field(default_factory=QAFConfig)
