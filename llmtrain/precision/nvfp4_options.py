"""TE 2.20's newer NVFP4BlockScaling options as recipe keys: 4over6 block scaling and row-scaled activations.

Keys (precision.*, names and values as TE's NVFP4BlockScaling fields):
  nvfp4_4over6               none | weights | activations | all: operands quantized with 4over6
  nvfp4_4over6_e4m3_use_256  none | weights | activations | all: of those, which map the amax to 256
                             instead of 448 (TE's default: all)
  nvfp4_4over6_err_mode      MAE | MSE: the error that picks map-to-4 or map-to-6 per block
  row_scaled_activation      one FP32 amax per row for the forward activation

Which operands TE gives them (transformer_engine/pytorch/quantization.py, NVFP4BlockScalingRecipeState):
4over6 "weights" is the weight quantizer, i.e. W in fprop and W^T in dgrad; "activations" the forward
input quantizer, i.e. x in fprop and x^T in wgrad; gradients never. Row-scaled is the forward input's
row-wise usage only (x in fprop); its column-wise wgrad operand keeps one amax. TE refuses 4over6 on a
quantizer with RHT or stochastic rounding, and its reference takes row-scaled with 1x16 blocks only; the
preflight checks here refuse the same in one line each.
"""

from dataclasses import dataclass

from llmtrain.errors import ConfigError

SCOPES = ["none", "weights", "activations", "all"]
ERR_MODES = ["MAE", "MSE"]
SCOPE_OPERANDS = {
    "none": (),
    "weights": ("fprop_w", "dgrad_w"),
    "activations": ("fprop_x", "wgrad_x"),
    "all": ("fprop_w", "dgrad_w", "fprop_x", "wgrad_x"),
}
ROW_SCALED_OPERANDS = ("fprop_x",)
_NEAREST_FIX = {"fprop": "precision.fprop_rounding=nearest", "dgrad": "precision.sr_operands=grad",
               "wgrad": "precision.sr_operands=grad"}  # fmt: skip


@dataclass(frozen=True)
class FourOverSix:
    """TE 2.20's `nvfp4_4over6` block scaling (scaling.nvfp4_4over6); NVFP4, round-to-nearest only.
    Defined here, not in quantize.py, so that validating a config does not import torch."""

    err_mode: str = "MAE"  # MAE | MSE: the error that picks map-to-4 or map-to-6 per block
    e4m3_max: int = 448  # 448 | 256: the E4M3 range the tensor scale maps the amax to

    @property
    def rcp_decode(self) -> float:
        """fp32(1 / (6 * e4m3_max)): the per-tensor decode factor is amax times this."""
        from llmtrain.precision import scaling  # torch: only when quantizing

        return scaling.RCP_2688 if self.e4m3_max == 448 else scaling._f32_quotient(1.0, 6.0 * self.e4m3_max)


@dataclass(frozen=True)
class NVFP4Options:
    four_over_six: str = "none"
    e4m3_use_256: str = "all"
    err_mode: str = "MAE"
    row_scaled_activation: bool = False

    @classmethod
    def from_config(cls, cfg) -> "NVFP4Options":
        from llmtrain.precision.recipe import cfg_get

        return cls(
            str(cfg_get(cfg, "nvfp4_4over6", "none")),
            str(cfg_get(cfg, "nvfp4_4over6_e4m3_use_256", "all")),
            str(cfg_get(cfg, "nvfp4_4over6_err_mode", "MAE")),
            bool(cfg_get(cfg, "row_scaled_activation", False)),
        )

    @property
    def active(self) -> bool:
        return self.four_over_six != "none" or self.row_scaled_activation

    def four_over_six_for(self, name: str) -> FourOverSix | None:
        """The 4over6 setting of operand `name` (e.g. "fprop_w"), None outside the nvfp4_4over6 scope."""
        if name not in SCOPE_OPERANDS[self.four_over_six]:
            return None
        return FourOverSix(self.err_mode, 256 if name in SCOPE_OPERANDS[self.e4m3_use_256] else 448)

    def row_scaled_for(self, name: str) -> bool:
        return self.row_scaled_activation and name in ROW_SCALED_OPERANDS

    def describe(self) -> str:
        out = []
        if self.four_over_six != "none":
            out.append(f"4over6={self.four_over_six}/{self.err_mode}/256:{self.e4m3_use_256}")
        if self.row_scaled_activation:
            out.append("row-scaled x")
        return " ".join(out)

    def te_fields(self) -> dict:
        """NVFP4BlockScaling fields (TE >= 2.20); {} while no option is on, so older TEs keep working.
        All four are given when one is: TE's own defaults come from NVTE_* environment variables."""
        if not self.active:
            return {}
        return {
            "nvfp4_4over6": self.four_over_six,
            "nvfp4_4over6_e4m3_use_256": self.e4m3_use_256,
            "nvfp4_4over6_err_mode": self.err_mode,
            "row_scaled_activation": self.row_scaled_activation,
        }


def validate(recipe, where: str = "") -> None:
    """One-line ConfigErrors for options `recipe` (the base recipe, or a phase's `where`) cannot take."""
    opts = recipe.nvfp4
    for key, value, allowed in (("nvfp4_4over6", opts.four_over_six, SCOPES),
                                ("nvfp4_4over6_e4m3_use_256", opts.e4m3_use_256, SCOPES),
                                ("nvfp4_4over6_err_mode", opts.err_mode, ERR_MODES)):  # fmt: skip
        if value not in allowed:
            raise ConfigError(f"precision.{key}", value, "not a valid choice", allowed)
    ops = recipe.operands
    if opts.four_over_six != "none":
        key, scope = "precision.nvfp4_4over6", opts.four_over_six
        chosen = [n for n in SCOPE_OPERANDS[scope] if ops[n].quantized]
        if not chosen and not where:
            raise ConfigError(
                key, scope, f"selects no quantized operand ({', '.join(SCOPE_OPERANDS[scope])} are bf16); "
                "use precision=nvfp4 or precision.nvfp4_4over6=none",
            )  # fmt: skip
        for n in chosen:
            if ops[n].fmt != "nvfp4":
                raise ConfigError(
                    key, scope, f"4over6 is an NVFP4 block scaling, operand {n} is {ops[n].fmt}{where}; "
                    "use precision=nvfp4 or precision.nvfp4_4over6=none",
                )  # fmt: skip
            if ops[n].rounding == "stochastic":
                raise ConfigError(
                    key, scope, f"TE's 4over6 does not support stochastic rounding, operand {n} rounds "
                    f"stochastically{where}; "
                    + ("round it to nearest there" if where else f"set {_NEAREST_FIX[n.split('_')[0]]}")
                    + " or narrow precision.nvfp4_4over6",
                )  # fmt: skip
        if "wgrad_x" in chosen and recipe.rht:
            raise ConfigError(
                key, scope, f"TE's 4over6 with the RHT is not implemented (wgrad_x takes the RHT{where}); "
                "set precision.rht=false or precision.nvfp4_4over6=weights",
            )  # fmt: skip
    if opts.row_scaled_activation:
        key, x = "precision.row_scaled_activation", ops["fprop_x"]
        if not x.quantized:
            if not where:
                raise ConfigError(
                    key, True, "the fprop activation (fprop_x) is bf16: nothing to scale per row"
                )
        elif x.fmt != "nvfp4":
            raise ConfigError(
                key, True, f"row-scaled is an NVFP4 option, fprop_x is {x.fmt}{where}; set it false"
            )
        elif x.block_2d:
            raise ConfigError(
                key, True, f"TE's row-scaled NVFP4 takes 1x16 blocks, fprop_x has 16x16 tiles{where}; "
                "set precision.operands.fprop_x.block_2d=false",
            )  # fmt: skip
        elif x.rounding == "stochastic":
            raise ConfigError(
                key, True, f"TE's row-scaled forward activation rounds to nearest, fprop_x rounds stochastically"
                f"{where}; " + ("round it to nearest there" if where else "set precision.fprop_rounding=nearest"),
            )  # fmt: skip


def emulated_refusal(prec) -> str | None:
    """Why the Megatron engine's emulated back end (llmtrain's quantizers inside TE) cannot run `prec`."""
    opts = NVFP4Options.from_config(prec)
    keys = []
    if opts.four_over_six != "none":
        keys.append(f"precision.nvfp4_4over6={opts.four_over_six}")
    if opts.row_scaled_activation:
        keys.append("precision.row_scaled_activation=true")
    if not keys:
        return None
    return (
        f"{' and '.join(keys)} is emulated only on engine=torch; on the Megatron engine it needs a Blackwell "
        "GPU (native TE)"
    )
