"""PrecisionRecipe: the per-GEMM, per-operand description built from a PrecisionConfig, and its validation.

Operands of y = x W^T and its backward:
  fprop  y  = x  @ W^T     operands x (activation), W (weight)      blocks along in_features
  dgrad  dx = dy @ W       operands dy (gradient), W (weight)       blocks along out_features
  wgrad  dW = dy^T @ x     operands dy (gradient), x (activation)   blocks along tokens (RHT here)
"""

from dataclasses import dataclass

from llmtrain.errors import ConfigError
from llmtrain.precision.config import BACKENDS, PRECISION_NAMES
from llmtrain.precision.formats import ROUNDINGS, SR_BITS
from llmtrain.precision.quantize import FORMATS

OPERAND_FORMATS = ["bf16", *FORMATS]
QAF_TRIGGERS = ["off", "sqrt3", "fraction"]
RHT_SIGNS = ["te", "random"]
SR_OPERANDS = ["grad", "all"]
TORCH_BACKENDS = ["auto", "torch"]


@dataclass(frozen=True)
class Operand:
    fmt: str = "bf16"  # bf16 = left in high precision
    rounding: str = "nearest"
    block_2d: bool = False

    @property
    def quantized(self) -> bool:
        return self.fmt != "bf16"

    def __str__(self) -> str:
        if not self.quantized:
            return "hp"
        extra = ("/2d" if self.block_2d else "") + ("/sr" if self.rounding == "stochastic" else "")
        return self.fmt + extra


HP = Operand()


@dataclass(frozen=True)
class PrecisionRecipe:
    fprop_x: Operand = HP
    fprop_w: Operand = HP
    dgrad_dy: Operand = HP
    dgrad_w: Operand = HP
    wgrad_dy: Operand = HP
    wgrad_x: Operand = HP
    rht: bool = False
    rht_size: int = 16
    rht_signs: str = "te"

    @classmethod
    def from_config(cls, cfg) -> "PrecisionRecipe":
        w_fmt, a_fmt, g_fmt = cfg.weight_format, cfg.activation_format, cfg.grad_format
        w2d = bool(cfg.weight_block_2d)

        def op(fmt, rounding, block_2d=False):
            return Operand(fmt, rounding, block_2d and fmt in ("mxfp8", "nvfp4"))

        other = {"all": None, "grad": "nearest"}[cfg.sr_operands]
        r = {}
        if cfg.quantize_fprop:
            r |= dict(fprop_x=op(a_fmt, cfg.fprop_rounding), fprop_w=op(w_fmt, cfg.fprop_rounding, w2d))
        if cfg.quantize_dgrad:
            r |= dict(
                dgrad_dy=op(g_fmt, cfg.dgrad_rounding), dgrad_w=op(w_fmt, other or cfg.dgrad_rounding, w2d)
            )
        if cfg.quantize_wgrad:
            r |= dict(wgrad_dy=op(g_fmt, cfg.wgrad_rounding), wgrad_x=op(a_fmt, other or cfg.wgrad_rounding))
        rht = bool(cfg.rht) and cfg.quantize_wgrad
        return cls(**r, rht=rht, rht_size=int(cfg.rht_size), rht_signs=cfg.rht_signs)

    @property
    def quantized(self) -> bool:
        return any(o.quantized for o in self.operands.values())

    @property
    def operands(self) -> dict[str, Operand]:
        names = ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")
        return {n: getattr(self, n) for n in names}

    def describe(self) -> str:
        ops = self.operands
        rht = f" rht{self.rht_size}" if self.rht else ""
        return (
            f"fprop x={ops['fprop_x']} w={ops['fprop_w']} | dgrad dy={ops['dgrad_dy']} w={ops['dgrad_w']} | "
            f"wgrad dy={ops['wgrad_dy']} x={ops['wgrad_x']}{rht}"
        )


def _choice(key: str, value, allowed: list) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "not a valid choice", allowed)


def validate(cfg, num_layers: int | None = None) -> None:
    """Raise ConfigError for anything the precision layer cannot honour (names, ranges, no-op recipes)."""
    _choice("precision.name", cfg.name, PRECISION_NAMES)
    _choice("precision.backend", cfg.backend, BACKENDS)
    for role in ("weight_format", "activation_format", "grad_format"):
        _choice(f"precision.{role}", getattr(cfg, role), OPERAND_FORMATS)
    for gemm in ("fprop", "dgrad", "wgrad"):
        _choice(f"precision.{gemm}_rounding", getattr(cfg, f"{gemm}_rounding"), list(ROUNDINGS))
    _choice("precision.sr_operands", cfg.sr_operands, SR_OPERANDS)
    _choice("precision.sr_bits", cfg.sr_bits, list(SR_BITS))  # [prec-num]
    _choice("precision.rht_signs", cfg.rht_signs, RHT_SIGNS)
    _choice("precision.qaf.trigger", cfg.qaf.trigger, QAF_TRIGGERS)
    if cfg.rht_size != 16:
        raise ConfigError("precision.rht_size", cfg.rht_size, "only 16-point transforms are supported", [16])
    if cfg.monitor.interval < 1:
        raise ConfigError("precision.monitor.interval", cfg.monitor.interval, "must be >= 1")
    if cfg.qaf.patience < 1:
        raise ConfigError("precision.qaf.patience", cfg.qaf.patience, "must be >= 1")
    if not 0.0 < cfg.qaf.fraction <= 1.0:
        raise ConfigError("precision.qaf.fraction", cfg.qaf.fraction, "must be in (0, 1]")
    for end in ("first", "last"):
        if getattr(cfg.bf16_layers, end) < 0:
            raise ConfigError(f"precision.bf16_layers.{end}", getattr(cfg.bf16_layers, end), "must be >= 0")

    recipe = PrecisionRecipe.from_config(cfg)
    if cfg.name == "bf16":
        if recipe.quantized:
            raise ConfigError(
                "precision.name",
                "bf16",
                "BF16 does not quantize, yet a format other than bf16 is set; "
                "pick a quantized precision, e.g. precision=fp8_cs",
                [n for n in PRECISION_NAMES if n != "bf16"],
            )
        if cfg.qaf.trigger != "off" or cfg.monitor.enabled:
            raise ConfigError(
                "precision.name", "bf16", "the sqrt(3) monitor and QAF need a quantized precision"
            )
        return
    if not recipe.quantized:
        raise ConfigError(
            "precision.name",
            cfg.name,
            "every operand format is bf16 or every GEMM is disabled, so nothing "
            "would be quantized; set precision.weight_format/activation_format/grad_format",
        )
    if cfg.qaf.trigger == "sqrt3" and not cfg.monitor.enabled:
        raise ConfigError(
            "precision.qaf.trigger",
            "sqrt3",
            "needs the monitor; set precision.monitor.enabled=true",
            ["off", "fraction"],
        )
    if num_layers is not None:
        first, last = cfg.bf16_layers.first, cfg.bf16_layers.last
        if first + last >= num_layers:
            raise ConfigError(
                "precision.bf16_layers",
                f"first={first} last={last}",
                f"keeps all {num_layers} transformer layers in BF16, so nothing would be quantized; lower it, "
                f"e.g. precision.bf16_layers.last={max(num_layers - 1 - first, 0)}",
            )
