"""PrecisionRecipe: the per-GEMM, per-operand description built from a PrecisionConfig, and its validation.

Operands of y = x W^T and its backward:
  fprop  y  = x  @ W^T     operands x (activation), W (weight)      blocks along in_features
  dgrad  dx = dy @ W       operands dy (gradient), W (weight)       blocks along out_features
  wgrad  dW = dy^T @ x     operands dy (gradient), x (activation)   blocks along tokens (RHT here)

Each operand's format, rounding and block shape come from the role-level keys (weight_/activation_/
grad_format, <gemm>_rounding, sr_operands, weight_block_2d, quantize_<gemm>), then from
`precision.operands.<gemm>_<operand>` where a key is set there. The RHT belongs to the wgrad GEMM: it
must transform both of its operands (dy^T H H^T x = dy^T x only when H is applied to both), so
`operands.wgrad_dy.rht` and `operands.wgrad_x.rht` must agree and no other operand takes one.
"""

from dataclasses import dataclass, field

from llmtrain.errors import ConfigError
from llmtrain.precision import nvfp4_options
from llmtrain.precision.config import BACKENDS, OPERAND_NAMES, PRECISION_NAMES, ROUNDINGS, SR_BITS
from llmtrain.precision.nvfp4_options import FourOverSix, NVFP4Options
from llmtrain.precision.registry import FORMATS, blocked_formats, get_format

OPERAND_FORMATS = ["bf16", *FORMATS]
QAF_TRIGGERS = ["off", "sqrt3", "fraction"]
RHT_SIGNS = ["te", "random"]
SR_OPERANDS = ["grad", "all"]
TORCH_BACKENDS = ["auto", "torch"]
BLOCK_2D_FORMATS = blocked_formats()  # mxfp8, nvfp4, mxfp4


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


def cfg_get(obj, key: str, default=None):
    """obj.key for a DictConfig, a dict or a dataclass instance alike (None stays None)."""
    if obj is None:
        return default
    if isinstance(obj, dict) or hasattr(obj, "keys"):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _role_default(cfg, name: str) -> tuple[str, str, bool, bool]:
    """(format, rounding, block_2d, GEMM enabled) of one operand from the role-level keys."""
    gemm, operand = name.split("_")
    fmt = {"x": cfg.activation_format, "w": cfg.weight_format, "dy": cfg.grad_format}[operand]
    rounding = cfg_get(cfg, f"{gemm}_rounding")
    if gemm != "fprop" and operand != "dy" and cfg.sr_operands == "grad":
        rounding = "nearest"  # sr_operands=grad: of dgrad/wgrad, only the gradient operand takes it
    return fmt, rounding, bool(cfg.weight_block_2d) and operand == "w", bool(cfg_get(cfg, f"quantize_{gemm}"))


def operand_overrides(cfg) -> dict[str, dict]:
    """operand name -> {key: value} for the keys set (not None) under cfg.operands."""
    operands = getattr(cfg, "operands", None)
    out = {}
    for name in OPERAND_NAMES if operands is not None else ():
        setting = cfg_get(operands, name)
        keys = {k: cfg_get(setting, k) for k in ("format", "rounding", "block_2d", "rht")}
        keys = {k: v for k, v in keys.items() if v is not None}
        if keys:
            out[name] = keys
    return out


def wgrad_rht(cfg, overrides: dict) -> dict[str, bool]:
    return {n: bool(overrides.get(n, {}).get("rht", cfg.rht)) for n in ("wgrad_dy", "wgrad_x")}


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
    sr_bits: int = 8  # random bits per element in stochastic rounding (8 = native TE, 24 = unbiased)
    nvfp4: NVFP4Options = field(
        default_factory=NVFP4Options
    )  # 4over6 / row-scaled activations (TE 2.20), for NVFP4 operands

    @classmethod
    def from_config(cls, cfg) -> "PrecisionRecipe":
        """Role-level keys first, then the per-operand overrides in `cfg.operands` (explicit keys win)."""
        overrides = operand_overrides(cfg)
        ops = {}
        for name in OPERAND_NAMES:
            fmt, rounding, block_2d, enabled = _role_default(cfg, name)
            o = overrides.get(name, {})
            if not enabled and "format" not in o:
                continue  # GEMM left in high precision (quantize_<gemm>=false), no explicit format
            fmt = o.get("format", fmt)
            rounding = o.get("rounding", rounding)
            block_2d = bool(o.get("block_2d", block_2d)) and fmt in BLOCK_2D_FORMATS
            if fmt != "bf16":
                ops[name] = Operand(fmt, rounding, block_2d)
        rht = wgrad_rht(cfg, overrides)["wgrad_dy"] and ("wgrad_dy" in ops or "wgrad_x" in ops)
        return cls(
            **ops, rht=rht, rht_size=int(cfg.rht_size), rht_signs=cfg.rht_signs, sr_bits=int(cfg.sr_bits),
            nvfp4=NVFP4Options.from_config(cfg),
        )  # fmt: skip

    def four_over_six(self, name: str) -> FourOverSix | None:
        """4over6 setting of operand `name` (None: plain scaling), for NVFP4 operands only."""
        return self.nvfp4.four_over_six_for(name) if getattr(self, name).fmt == "nvfp4" else None

    def row_scaled(self, name: str) -> bool:
        """Whether operand `name` is quantized with one amax per row (NVFP4 only)."""
        return self.nvfp4.row_scaled_for(name) and getattr(self, name).fmt == "nvfp4"

    @property
    def quantized(self) -> bool:
        return any(o.quantized for o in self.operands.values())

    @property
    def operands(self) -> dict[str, Operand]:
        return {n: getattr(self, n) for n in OPERAND_NAMES}

    def describe(self) -> str:
        ops = self.operands
        rht = f" rht{self.rht_size}" if self.rht else ""
        opts = f" nvfp4 {self.nvfp4.describe()}" if self.nvfp4.active else ""
        return (
            f"fprop x={ops['fprop_x']} w={ops['fprop_w']} | dgrad dy={ops['dgrad_dy']} w={ops['dgrad_w']} | "
            f"wgrad dy={ops['wgrad_dy']} x={ops['wgrad_x']}{rht}{opts}"
        )


def bf16_layer_counts(cfg, num_layers: int) -> tuple[int, int]:
    """(first, last): transformer layers kept in BF16 at each end, from a count or a fraction of depth.

    A fraction f keeps floor(f * num_layers + 0.5) layers (round half up): 0.125 keeps 2 of 16, 4 of 32.
    """
    b = cfg.bf16_layers
    out = []
    for end in ("first", "last"):
        count, frac = int(cfg_get(b, end, 0)), float(cfg_get(b, f"{end}_fraction", 0.0) or 0.0)
        out.append(count if not frac else int(frac * num_layers + 0.5))
    return out[0], out[1]


def _choice(key: str, value, allowed: list) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "not a valid choice", allowed)


def _validate_operands(cfg) -> None:
    overrides = operand_overrides(cfg)
    for name, keys in overrides.items():
        key = f"precision.operands.{name}"
        if "format" in keys:
            _choice(f"{key}.format", keys["format"], OPERAND_FORMATS)
        if "rounding" in keys:
            _choice(f"{key}.rounding", keys["rounding"], list(ROUNDINGS))
        if "rht" in keys and name not in ("wgrad_dy", "wgrad_x"):
            raise ConfigError(
                f"{key}.rht",
                keys["rht"],
                "the RHT belongs to the wgrad GEMM (along tokens); set operands.wgrad_dy.rht and "
                "operands.wgrad_x.rht, or precision.rht",
            )
    rht = wgrad_rht(cfg, overrides)
    if rht["wgrad_dy"] != rht["wgrad_x"]:
        raise ConfigError(
            "precision.operands.wgrad_x.rht",
            rht["wgrad_x"],
            f"wgrad dy has rht={rht['wgrad_dy']}: the RHT must transform both wgrad operands "
            "(dy^T H H^T x = dy^T x); set operands.wgrad_dy.rht and operands.wgrad_x.rht alike",
        )
    recipe = PrecisionRecipe.from_config(cfg)
    for name, keys in overrides.items():
        op = recipe.operands[name]
        if keys.get("block_2d") and op.quantized and op.fmt not in BLOCK_2D_FORMATS:
            raise ConfigError(
                f"precision.operands.{name}.block_2d",
                True,
                f"2-D blocks exist for {', '.join(BLOCK_2D_FORMATS)} only, this operand is {op.fmt}",
            )


def _validate_bf16_layers(cfg, num_layers: int | None, pipeline_stages: int = 1) -> None:
    b = cfg.bf16_layers
    for end in ("first", "last"):
        count, frac = cfg_get(b, end, 0), float(cfg_get(b, f"{end}_fraction", 0.0) or 0.0)
        if count < 0:
            raise ConfigError(f"precision.bf16_layers.{end}", count, "must be >= 0")
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"precision.bf16_layers.{end}_fraction", frac, "must be in [0, 1)")
        if count and frac:
            raise ConfigError(
                f"precision.bf16_layers.{end}_fraction",
                frac,
                f"precision.bf16_layers.{end}={count} is set too; give a count or a fraction, "
                f"e.g. precision.bf16_layers.{end}=0",
            )
    if num_layers is None:
        return
    first, last = bf16_layer_counts(cfg, num_layers)
    if first + last >= num_layers:
        fractions = "".join(
            f" ({end}_fraction={cfg_get(b, f'{end}_fraction')} -> {n})"
            for end, n in (("first", first), ("last", last))
            if cfg_get(b, f"{end}_fraction")
        )
        raise ConfigError(
            "precision.bf16_layers",
            f"first={first} last={last}",
            f"keeps all {num_layers} transformer layers in BF16{fractions}, so nothing would be quantized; "
            "lower it, e.g. "
            + (
                f"precision.bf16_layers.last={num_layers - 1 - first}"
                if first < num_layers
                else "precision.bf16_layers.first=0 precision.bf16_layers.last=0"
            )
            + (" (or precision=variant/fp8_cs_all_layers)" if cfg.name == "fp8_cs" else ""),
        )
    per_stage = num_layers // pipeline_stages
    formats = {cfg.weight_format, cfg.activation_format, cfg.grad_format} - {"bf16"}
    fp8_context = not any(get_format(f).element_bits == 4 for f in formats)  # as te_recipes picks it
    if fp8_context and max(first, last) > per_stage:  # Megatron-Core's FP8 config check: a traceback
        end, n = ("first", first) if first > per_stage else ("last", last)
        raise ConfigError(
            f"precision.bf16_layers.{end}",
            n,
            f"Megatron-Core's FP8 path keeps at most num_layers/pp = {num_layers}/{pipeline_stages} = "
            f"{per_stage} layers in BF16 at each end; lower it to {per_stage} or lower parallel.pp",
        )


def validate(cfg, num_layers: int | None = None, pipeline_stages: int = 1) -> None:
    """Raise ConfigError for anything the precision layer cannot honour (names, ranges, no-op recipes).
    `pipeline_stages`: the Megatron engine's parallel.pp (it keeps BF16 layers per end within one stage).

    The schedule's phases are checked here as far as the precision config alone allows; the checks that
    need train.steps and the LR schedule are in phases.validate_schedule (called at preflight).
    """
    from llmtrain.precision import phases  # phases builds on this module

    _choice("precision.name", cfg.name, PRECISION_NAMES)
    _choice("precision.backend", cfg.backend, BACKENDS)
    for role in ("weight_format", "activation_format", "grad_format"):
        _choice(f"precision.{role}", getattr(cfg, role), OPERAND_FORMATS)
    for gemm in ("fprop", "dgrad", "wgrad"):
        _choice(f"precision.{gemm}_rounding", getattr(cfg, f"{gemm}_rounding"), list(ROUNDINGS))
    _choice("precision.sr_operands", cfg.sr_operands, SR_OPERANDS)
    _choice("precision.sr_bits", cfg.sr_bits, list(SR_BITS))
    _choice("precision.rht_signs", cfg.rht_signs, RHT_SIGNS)
    _choice("precision.qaf.trigger", cfg.qaf.trigger, QAF_TRIGGERS)
    _validate_operands(cfg)
    nvfp4_options.validate(PrecisionRecipe.from_config(cfg))
    if cfg.rht_size != 16:
        raise ConfigError("precision.rht_size", cfg.rht_size, "only 16-point transforms are supported", [16])
    if cfg.monitor.interval < 1:
        raise ConfigError("precision.monitor.interval", cfg.monitor.interval, "must be >= 1")
    if cfg.qaf.patience < 1:
        raise ConfigError("precision.qaf.patience", cfg.qaf.patience, "must be >= 1")
    if not 0.0 < cfg.qaf.fraction <= 1.0:
        raise ConfigError("precision.qaf.fraction", cfg.qaf.fraction, "must be in (0, 1]")
    _validate_bf16_layers(cfg, None)

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
        if cfg.qaf.trigger != "off" or cfg.monitor.enabled or len(cfg_get(cfg, "schedule") or []):
            raise ConfigError(
                "precision.name",
                "bf16",
                "the sqrt(3) monitor, QAF and precision.schedule need a quantized precision",
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
    phase_list = phases.phases_from_config(cfg)  # phase names, triggers, targets and formats
    for phase, phase_recipe in zip(phase_list, phases.phase_recipes(cfg, phase_list)[1:]):
        nvfp4_options.validate(phase_recipe, f" in {phase.key} ({phase.name})")
    _validate_bf16_layers(cfg, num_layers, pipeline_stages)
