"""PrecisionController: drives the sqrt(3) monitor's bookkeeping and the precision schedule from the loop.

The loop asks it, after every step, whether to probe (`should_probe`) and whether a phase starts
(`advance`); it hands the engine the new recipe (`engine.set_phase(controller.recipe)`), and takes the
learning rate from it (`learning_rate`), since a phase may reset the LR. Its state (active phase, each
phase's start step, the probe streak) goes into the checkpoint's trainer state, so a resumed run is in
the same phase with the same LR. Inert for bf16.
"""

import statistics

from llmtrain.errors import CheckpointError
from llmtrain.precision.monitor import NoiseProbe
from llmtrain.precision.phases import (
    Phase,
    RunShape,
    base_steps,
    is_qaf,
    phase_recipes,
    phases_from_config,
    switch_step,
    validate_schedule,
)
from llmtrain.precision.recipe import PrecisionRecipe, validate
from llmtrain.train.schedule import learning_rate


class PrecisionController:
    def __init__(self, cfg, total_steps: int, *, optim=None, tokens_per_step: int = 1):
        validate(cfg)
        self.cfg, self.total_steps = cfg, total_steps
        self.active = cfg.name != "bf16"
        self.run = RunShape(int(total_steps), int(tokens_per_step), optim)
        if not self.active:
            self.phases: list[Phase] = []
        elif optim is not None:
            self.phases = validate_schedule(cfg, self.run)
        else:  # unit use without an LR schedule: decay triggers cannot be placed
            self.phases = phases_from_config(cfg)
        self.recipes: list[PrecisionRecipe] = phase_recipes(cfg, self.phases) if self.active else []
        self.phase = 0  # 0: the base recipe; i: phases[i - 1] is active
        self.starts: list[int] = []  # starts[i]: the step after which phases[i] began
        self.below_streak = 0  # consecutive probes with the summary ratio below the threshold
        self.last_ratio: float | None = None

    # ---- what is active --------------------------------------------------------------------------
    @property
    def recipe(self) -> PrecisionRecipe | None:
        return self.recipes[self.phase] if self.active else None

    @property
    def phase_name(self) -> str:
        return self.phases[self.phase - 1].name if self.phase else "base"

    @property
    def qaf_active(self) -> bool:
        return self.phase > 0 and is_qaf(self.recipes[0], self.recipe)

    @property
    def qaf_step(self) -> int | None:
        return self.starts[self.phase - 1] if self.qaf_active else None

    @property
    def base_steps(self) -> int:
        """Length of the base LR schedule (train.steps minus appended phases)."""
        return (
            base_steps(self.phases, self.run)
            if self.phases and self.run.optim is not None
            else self.total_steps
        )

    # ---- sqrt(3) monitor -------------------------------------------------------------------------
    def should_probe(self, step: int) -> bool:
        return self.active and bool(self.cfg.monitor.enabled) and step % self.cfg.monitor.interval == 0

    def record_probe(self, step: int, probe: "NoiseProbe | dict[str, float] | None") -> dict[str, float]:
        """Metrics to log: sqrt3/<layer>, sqrt3/all, min, median, frac_below, below_streak, and the
        NoiseProbe's other definitions and norms (sqrt3/backward, sqrt3/sr, sqrt3/grad_norm, ...).

        `probe` is what the engine's probe returned; a plain {layer: ratio, "all": ratio} dict also works.
        """
        ratios, extra = (probe.ratios, probe.metrics) if isinstance(probe, NoiseProbe) else (probe or {}, {})
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
        return metrics | {f"sqrt3/{k}": v for k, v in extra.items()}

    # ---- phases ----------------------------------------------------------------------------------
    def advance(self, step: int) -> Phase | None:
        """After step `step`: the phase that starts now (at most one per step), else None."""
        if not self.active or self.phase >= len(self.phases):
            return None
        nxt = self.phases[self.phase]
        if nxt.trigger == "sqrt3":
            go = self.below_streak >= nxt.patience
        else:
            k = switch_step(nxt, self.phases, self.run)
            go = k is not None and step >= k
        if not go:
            return None
        self.phase += 1
        self.starts.append(int(step))
        self.below_streak = 0  # a later sqrt3 phase counts its own streak
        return nxt

    def should_switch_qaf(self, step: int) -> bool:
        """Legacy API: True once, at the step where the (mapped) QAF phase starts."""
        return self.advance(step) is not None

    def learning_rate(self, step: int, base_lr_at) -> float:
        """LR for 0-based step `step`: the base schedule, or the schedule of the last phase that reset it."""
        reset = [i for i in range(self.phase) if self.phases[i].lr.reset]
        if not reset:
            return base_lr_at(step)
        i = reset[-1]
        phase, start, optim = self.phases[i], self.starts[i], self.run.optim
        end = self.total_steps
        for later in self.phases[i + 1 :]:
            k = switch_step(later, self.phases, self.run) if later.lr.reset else None
            if k is not None and k > start:
                end = min(end, k)
        lr = phase.lr
        peak = float(lr.peak if lr.peak is not None else optim.lr)
        low = float(lr.min if lr.min is not None else optim.min_lr)
        return learning_rate(
            step - start,
            lr=peak,
            min_lr=low,
            warmup=lr.warmup_steps,
            total=max(end - start, 1),
            schedule=lr.schedule,
            decay_fraction=float(optim.decay_fraction),
        )

    # ---- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "phase": self.phase,
            "phase_name": self.phase_name,
            "phase_starts": list(self.starts),
            "qaf_active": self.qaf_active,
            "qaf_step": self.qaf_step,
            "below_streak": self.below_streak,
            "last_ratio": self.last_ratio,
        }

    def load_state_dict(self, state: dict) -> None:
        if "phase" in state:
            phase, starts, name = (
                int(state["phase"]),
                list(state.get("phase_starts", [])),
                state.get("phase_name"),
            )
        else:  # checkpoints from before the schedule: only the QAF flags
            phase = 1 if state.get("qaf_active") else 0
            starts = [state["qaf_step"]] if phase else []
            name = self.phases[0].name if phase and self.phases else "base"
        if phase > len(self.phases) or (phase and self.phases[phase - 1].name != name):
            names = ["base", *(p.name for p in self.phases)]
            raise CheckpointError(
                f"the checkpoint is in precision phase {name!r} (#{phase}), which precision.schedule "
                f"({', '.join(names)}) does not have at that position; resume with the schedule it was "
                "saved with, or train.resume=never"
            )
        self.phase, self.starts = phase, [int(s) for s in starts]
        self.below_streak = int(state.get("below_streak", 0))
        self.last_ratio = state.get("last_ratio")
