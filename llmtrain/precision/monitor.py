"""The sqrt(3) monitor and the QAF switch.

Estimator (per quantized layer, on one micro-batch): run the quantized forward once, then two backwards
through the same graph, one with dgrad/wgrad quantized (what training uses) and one with them in high
precision (what QAF uses), and take the weight gradients G_q and G_hp:

    ratio = ||G_hp||_F / ||G_q - G_hp||_F

i.e. gradient norm over the norm of the noise that backward quantization adds (forward quantization is
common to both, so it is not counted: it is the part QAF keeps). "all" is the same ratio over all
quantized weights together. "FP4 All the Way" (Chmiel et al., 2025) finds quantized training stops
helping once this falls below about sqrt(3); with stochastic rounding G_q is one noisy draw, so single
probes fluctuate and the switch waits for `qaf.patience` consecutive probes below the threshold.
"""

import math
import statistics

import torch

from llmtrain.precision.convert import quantized_layers
from llmtrain.precision.recipe import validate


def probe_quantization_noise(model, micro_batch, loss_fn) -> dict[str, float]:
    """Per-layer ratios (module name -> ratio) plus "all"; {} when nothing is quantized.

    The parameters' .grad, the layers' QAF mode and the weights are left untouched. Under data
    parallelism the squared norms are summed over ranks (each probes its own micro-batch).
    """
    layers = quantized_layers(model)
    if not layers:
        return {}
    mods, weights = list(layers.values()), [m.weight for m in layers.values()]
    modes = [m.qaf for m in mods]
    try:
        for m in mods:
            m.qaf = False
        loss = loss_fn(model, micro_batch)
        g_q = torch.autograd.grad(loss, weights, retain_graph=True)
        for m in mods:
            m.qaf = True
        g_hp = torch.autograd.grad(loss, weights)
    finally:
        for m, mode in zip(mods, modes):
            m.qaf = mode
    sq = torch.stack(
        [
            torch.stack([b.float().square().sum(), (a.float() - b.float()).square().sum()])
            for a, b in zip(g_q, g_hp)
        ]
    )  # [layers, 2]: ||G_hp||^2, ||G_q - G_hp||^2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Sum over data-parallel ranks so every rank logs the same ratios and takes the same QAF decision.
        torch.distributed.all_reduce(sq)
    norms = sq.sqrt()
    ratios = (norms[:, 0] / norms[:, 1]).tolist()  # x/0 = inf: backward not quantized (or exact)
    out = dict(zip(layers, ratios))
    total = sq.sum(0).sqrt()
    out["all"] = (total[0] / total[1]).item()
    return out


class PrecisionController:
    """Drives the sqrt(3) monitor and the QAF switch from the training loop (inert for bf16)."""

    def __init__(self, cfg, total_steps: int):
        validate(cfg)
        self.cfg, self.total_steps = cfg, total_steps
        self.active = cfg.name != "bf16"
        self.qaf_active = False
        self.qaf_step: int | None = None
        self.below_streak = 0  # consecutive probes with the summary ratio below the threshold
        self.last_ratio: float | None = None

    def should_probe(self, step: int) -> bool:
        return self.active and bool(self.cfg.monitor.enabled) and step % self.cfg.monitor.interval == 0

    def record_probe(self, step: int, ratios: dict[str, float]) -> dict[str, float]:
        """Metrics to log: sqrt3/<layer>, sqrt3/all, sqrt3/min, sqrt3/median, sqrt3/frac_below, streak."""
        per_layer = {k: v for k, v in ratios.items() if k != "all"}
        if not per_layer:
            return {}
        threshold = float(self.cfg.monitor.threshold)
        vals = list(per_layer.values())
        summary = ratios.get("all", statistics.median(vals))
        self.last_ratio = summary
        self.below_streak = self.below_streak + 1 if summary < threshold else 0
        metrics = {f"sqrt3/{k}": v for k, v in per_layer.items()}
        metrics |= {
            "sqrt3/all": summary,
            "sqrt3/min": min(vals),
            "sqrt3/median": statistics.median(vals),
            "sqrt3/frac_below": sum(v < threshold for v in vals) / len(vals),
            "sqrt3/below_streak": self.below_streak,
        }
        return metrics

    def should_switch_qaf(self, step: int) -> bool:
        """True once, at the step where QAF starts (the caller then calls engine.set_qaf(True))."""
        if not self.active or self.qaf_active:
            return False
        trigger = self.cfg.qaf.trigger
        if trigger == "fraction":
            go = step >= math.ceil(self.cfg.qaf.fraction * self.total_steps)
        elif trigger == "sqrt3":
            go = self.below_streak >= self.cfg.qaf.patience
        else:
            go = False
        if go:
            self.qaf_active, self.qaf_step = True, step
        return go

    def state_dict(self) -> dict:
        return {
            "qaf_active": self.qaf_active,
            "qaf_step": self.qaf_step,
            "below_streak": self.below_streak,
            "last_ratio": self.last_ratio,
        }

    def load_state_dict(self, state: dict) -> None:
        self.qaf_active, self.qaf_step = bool(state["qaf_active"]), state["qaf_step"]
        self.below_streak = int(state.get("below_streak", 0))
        self.last_ratio = state.get("last_ratio")
