"""The precision layer: quantizers, the quantized linear, the sqrt(3) monitor and the QAF switch.

Engines call `convert_model` once after building the model and drive a `PrecisionController` from the
training loop.
"""

from llmtrain.errors import ConfigError
from llmtrain.precision.config import PRECISION_NAMES, PrecisionConfig

__all__ = ["PRECISION_NAMES", "PrecisionConfig", "PrecisionController", "convert_model"]


def convert_model(model, cfg: PrecisionConfig, *, seed: int = 0) -> None:
    """Swap the attention/MLP linears of `model` for quantized ones, in place (no-op for bf16)."""
    if cfg.name != "bf16":
        raise ConfigError("precision", cfg.name, "not implemented yet in the torch engine", ["bf16"])


class PrecisionController:
    """Drives the sqrt(3) monitor and the QAF switch from the training loop (no-op for bf16)."""

    def __init__(self, cfg: PrecisionConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.qaf_active = False
        self.qaf_step: int | None = None

    def should_probe(self, step: int) -> bool:
        return False

    def record_probe(self, step: int, ratios: dict[str, float]) -> dict[str, float]:
        return {}

    def should_switch_qaf(self, step: int) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"qaf_active": self.qaf_active, "qaf_step": self.qaf_step}

    def load_state_dict(self, state: dict) -> None:
        self.qaf_active, self.qaf_step = state["qaf_active"], state["qaf_step"]
