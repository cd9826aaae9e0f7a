"""The precision recipe as config: what the `precision/*.yaml` group fills in.

Only the schema lives here; the numerics live in the other modules of this package, the meaning of the
keys in recipe.py (operands) and schedule.py (phases).
"""

from dataclasses import dataclass, field
from typing import Any

from llmtrain.precision.recipes import PRECISION_NAMES  # noqa: F401 (the registered recipe names)

BACKENDS = ["auto", "native", "custom", "torch"]
ROUNDINGS = ("nearest", "stochastic")
# Random bits per element for stochastic rounding: 8 as native TE on Blackwell (cvt.rs.satfinite.e2m1x4
# takes one 32-bit word for 4 elements); 24 for studies that want the unbiased rounding.
SR_BITS = (8, 24)
OPERAND_NAMES = ["fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x"]


@dataclass
class BF16Layers:
    """Transformer layers kept in BF16 (not quantized), counted from either end.

    Each end takes a count or a fraction of the depth (not both); a fraction f of L layers keeps
    floor(f * L + 0.5) layers (round half up), so 0.125 keeps 2 of 16, 4 of 32 and 10 of 80.
    """

    first: int = 0
    last: int = 0
    first_fraction: float = 0.0
    last_fraction: float = 0.0


@dataclass
class MonitorConfig:
    """sqrt(3) rule monitor: gradient norm vs quantization noise, every `interval` steps."""

    enabled: bool = False
    interval: int = 100
    threshold: float = 1.7320508075688772


@dataclass
class QAFConfig:
    """Legacy QAF switch, kept working: it becomes a one-phase `schedule` (forward stays quantized,
    dgrad/wgrad go to BF16). New recipes write the phase in `schedule` instead."""

    trigger: str = "off"  # off | sqrt3 | fraction
    patience: int = 3  # sqrt3: consecutive monitor checks below the threshold before switching
    fraction: float = 0.9  # fraction: of train.steps after which to switch


@dataclass
class OperandSetting:
    """One GEMM operand's override of the role-level keys; None keeps what the role-level keys give."""

    format: str | None = None  # bf16 or a registered format (registry.py): fp8_e4m3, mxfp8, nvfp4, ...
    rounding: str | None = None  # nearest | stochastic
    block_2d: bool | None = None  # block x block tiles (16x16 nvfp4, 32x32 mxfp8/mxfp4) instead of 1-D blocks
    rht: bool | None = None  # wgrad_dy / wgrad_x only, and both alike (see recipe.py)


@dataclass
class OperandSettings:
    """Per-operand overrides (names as in recipe.py: GEMM _ operand)."""

    fprop_x: OperandSetting = field(default_factory=OperandSetting)
    fprop_w: OperandSetting = field(default_factory=OperandSetting)
    dgrad_dy: OperandSetting = field(default_factory=OperandSetting)
    dgrad_w: OperandSetting = field(default_factory=OperandSetting)
    wgrad_dy: OperandSetting = field(default_factory=OperandSetting)
    wgrad_x: OperandSetting = field(default_factory=OperandSetting)


@dataclass
class PhaseLR:
    """A phase's own learning-rate schedule: warm-up, then a decay from `peak` to `min` over the phase."""

    reset: bool = False
    warmup_steps: int = 0
    peak: float | None = None  # None: optim.lr
    min: float | None = None  # None: optim.min_lr
    schedule: str = "cosine"  # cosine | wsd | constant (wsd decays over optim.decay_fraction of the phase)


@dataclass
class PhaseConfig:
    """One entry of `precision.schedule` (see schedule.py for the exact trigger semantics)."""

    name: str = ""
    trigger: str = ""  # step | fraction | tokens | decay | sqrt3 | append
    at: float = 0.0  # step: step number; fraction: of train.steps; tokens: a count; decay: offset in steps
    patience: int = 3  # sqrt3: consecutive probes below the threshold
    steps: int = 0  # append: the phase's budget, as steps ...
    tokens: int = 0  # ... or tokens ...
    fraction: float = 0.0  # ... or a fraction of train.steps (exactly one of the three)
    # What changes, applied on top of the previous phase: target -> format, or -> {format, rounding,
    # block_2d}. Targets: a GEMM (fprop, dgrad, wgrad), an operand (wgrad_x, ...), "all", or a comma list.
    set: dict[str, Any] = field(default_factory=dict)
    lr: PhaseLR = field(default_factory=PhaseLR)


@dataclass
class PrecisionConfig:
    name: str = "bf16"
    backend: str = "auto"
    # Element formats per operand role: bf16 or a registered format (registry.py): fp8_e4m3 | fp8_e5m2 |
    # mxfp8 | nvfp4 | mxfp4
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
    rht_signs: str = "te"  # te: TE's fixed sign vector | random: one vector per run, drawn from train.seed
    # Rounding per GEMM: nearest | stochastic. fprop_rounding applies to x and W; dgrad_/wgrad_rounding to
    # the gradient operand, and also to W (dgrad) / x (wgrad) when sr_operands=all.
    fprop_rounding: str = "nearest"
    dgrad_rounding: str = "nearest"
    wgrad_rounding: str = "nearest"
    sr_operands: str = "grad"  # grad | all
    operands: OperandSettings = field(default_factory=OperandSettings)  # per-operand overrides of the above
    sr_bits: int = 8  # random bits per element in SR: 8 = native TE (cvt.rs), 24 = unbiased
    # TE 2.20's NVFP4BlockScaling options (nvfp4_options.py says which operands each reaches):
    nvfp4_4over6: str = "none"  # none | weights | activations | all: adaptive map-to-4-or-6 block scaling
    nvfp4_4over6_e4m3_use_256: str = (
        "all"  # none | weights | activations | all: 4over6 tensors with amax -> 256
    )
    nvfp4_4over6_err_mode: str = "MAE"  # MAE | MSE: the error 4over6 compares per block
    row_scaled_activation: bool = False  # one FP32 amax per row of the fprop activation
    bf16_layers: BF16Layers = field(default_factory=BF16Layers)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    qaf: QAFConfig = field(default_factory=QAFConfig)
    schedule: list[PhaseConfig] = field(default_factory=list)
