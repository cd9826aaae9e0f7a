"""The precision schedule: `precision.schedule`, a list of phases that change the recipe during a run.

Phases activate in list order; a phase's trigger is checked only once the one before it is active, after
each optimizer step. A phase "switches after step K": the step numbered K ran with the previous recipe,
steps K+1.. run with the new one, and K is the phase's start (logged with the switch, stored in the
checkpoint). Triggers, for a run of T = train.steps steps of G tokens:

    step      K = at                                   (1 <= K < T)
    fraction  K = ceil(at * T)                         (0 < at < 1)
    tokens    K = ceil(at / G)
    decay     K = D + at                               (at: offset in steps, negative = before; D: WSD:
              base steps - round(decay_fraction * base steps), so step D+1 is the first step of the
              decay ramp; cosine: D = optim.warmup_steps; constant: refused)
    sqrt3     at the first monitor probe after which `patience` probes in a row were below the threshold
    append    the phase is the last `steps` (or ceil(tokens / G), or floor(fraction * T + 0.5)) steps of
              the run: the base LR schedule ends where appended phases begin (T minus their budgets)

What a phase changes (`set`) applies on top of the previous phase's recipe: target -> format, or
target -> {format, rounding, block_2d}. Targets are a GEMM (fprop, dgrad, wgrad: both its operands), an
operand (fprop_x, fprop_w, dgrad_dy, dgrad_w, wgrad_dy, wgrad_x), "all", or a comma list of those. The
BF16 layers (bf16_layers) stay BF16 in every phase. A phase may also reset the learning rate
(`lr.reset`): from its start, `lr.warmup_steps` of linear warm-up to `lr.peak` and a decay to `lr.min`
over the rest of the phase (to the next phase that resets the LR, or the end of the run).

The legacy `precision.qaf.trigger` (sqrt3 | fraction) maps onto a one-phase schedule named "qaf"
(dgrad, wgrad -> bf16), with the same switch step as before.
"""

import math
from dataclasses import dataclass, replace

from llmtrain.errors import ConfigError
from llmtrain.precision.config import OPERAND_NAMES, ROUNDINGS
from llmtrain.precision.recipe import (
    BLOCK_2D_FORMATS,
    OPERAND_FORMATS,
    Operand,
    PrecisionRecipe,
    cfg_get,
    operand_overrides,
    wgrad_rht,
)

TRIGGERS = ["step", "fraction", "tokens", "decay", "sqrt3", "append"]
GEMMS = {"fprop": ("fprop_x", "fprop_w"), "dgrad": ("dgrad_dy", "dgrad_w"), "wgrad": ("wgrad_dy", "wgrad_x")}
TARGETS = [*GEMMS, *OPERAND_NAMES, "all"]
LR_SCHEDULES = ["cosine", "wsd", "constant"]
QAF_CHANGES = (("dgrad_dy", {"format": "bf16"}), ("dgrad_w", {"format": "bf16"}),
               ("wgrad_dy", {"format": "bf16"}), ("wgrad_x", {"format": "bf16"}))  # fmt: skip


@dataclass(frozen=True)
class PhaseLR:
    reset: bool = False
    warmup_steps: int = 0
    peak: float | None = None
    min: float | None = None
    schedule: str = "cosine"


@dataclass(frozen=True)
class Phase:
    index: int  # position in precision.schedule (for error messages: precision.schedule.<index>)
    name: str
    trigger: str
    at: float = 0.0
    patience: int = 3
    steps: int = 0
    tokens: int = 0
    fraction: float = 0.0
    changes: tuple = ()  # ((operand, {format?, rounding?, block_2d?}), ...) in application order
    lr: PhaseLR = PhaseLR()
    legacy: bool = False  # mapped from precision.qaf.*

    @property
    def key(self) -> str:
        return "precision.qaf.trigger" if self.legacy else f"precision.schedule.{self.index}"


def _targets(key: str, target: str) -> list[str]:
    out = []
    for part in (p.strip() for p in str(target).split(",")):
        if part not in TARGETS:
            raise ConfigError(f"{key}.set", part, "not a GEMM or operand", TARGETS)
        out += OPERAND_NAMES if part == "all" else list(GEMMS.get(part, (part,)))
    return out


def _change(key: str, target: str, value) -> dict:
    if isinstance(value, str):
        value = {"format": value}
    elif value is None or not hasattr(value, "items"):
        raise ConfigError(f"{key}.set.{target}", value, "give a format, or {format, rounding, block_2d}")
    change = {k: v for k, v in value.items() if v is not None}
    unknown = set(change) - {"format", "rounding", "block_2d"}
    if unknown or not change:
        raise ConfigError(
            f"{key}.set.{target}", dict(value), "keys: format, rounding, block_2d", ["format", "rounding"]
        )
    if "format" in change and change["format"] not in OPERAND_FORMATS:
        raise ConfigError(
            f"{key}.set.{target}.format", change["format"], "not a valid choice", OPERAND_FORMATS
        )
    if "rounding" in change and change["rounding"] not in ROUNDINGS:
        raise ConfigError(
            f"{key}.set.{target}.rounding", change["rounding"], "not a valid choice", list(ROUNDINGS)
        )
    return change


def phases_from_config(prec) -> list[Phase]:
    """Parse precision.schedule (or the legacy qaf keys) and check what the precision config alone decides."""
    entries = list(cfg_get(prec, "schedule") or [])
    if prec.qaf.trigger != "off":
        if entries:
            raise ConfigError(
                "precision.qaf.trigger",
                prec.qaf.trigger,
                "precision.schedule is set too; write the QAF switch as a schedule phase "
                "and set precision.qaf.trigger=off",
            )
        trigger = prec.qaf.trigger
        at = float(prec.qaf.fraction) if trigger == "fraction" else 0.0
        phase = Phase(
            0, "qaf", trigger, at=at, patience=int(prec.qaf.patience), changes=QAF_CHANGES, legacy=True
        )
        return [phase]
    phases, names, appended = [], set(), False
    for i, e in enumerate(entries):
        key = f"precision.schedule.{i}"
        name = str(cfg_get(e, "name") or "")
        if not name or name in names or name == "base":
            raise ConfigError(f"{key}.name", name, "each phase needs a unique name (not 'base')")
        names.add(name)
        trigger = cfg_get(e, "trigger")
        if trigger not in TRIGGERS:
            raise ConfigError(f"{key}.trigger", trigger, "not a valid choice", TRIGGERS)
        changes = []
        for target, value in (cfg_get(e, "set") or {}).items():
            change = _change(key, target, value)
            changes += [(op, change) for op in _targets(key, target)]
        lr = cfg_get(e, "lr") or {}
        lr = PhaseLR(
            reset=bool(cfg_get(lr, "reset", False)),
            warmup_steps=int(cfg_get(lr, "warmup_steps", 0) or 0),
            peak=cfg_get(lr, "peak"),
            min=cfg_get(lr, "min"),
            schedule=str(cfg_get(lr, "schedule", "cosine")),
        )
        if lr.schedule not in LR_SCHEDULES:
            raise ConfigError(f"{key}.lr.schedule", lr.schedule, "not a valid choice", LR_SCHEDULES)
        if (
            lr.warmup_steps < 0
            or (lr.peak is not None and lr.peak <= 0)
            or (lr.min is not None and lr.min < 0)
        ):
            raise ConfigError(
                f"{key}.lr", dict(cfg_get(e, "lr") or {}), "warmup_steps >= 0, peak > 0, min >= 0"
            )
        phase = Phase(
            i,
            name,
            trigger,
            at=float(cfg_get(e, "at", 0.0) or 0.0),
            patience=int(cfg_get(e, "patience", 3) or 0),
            steps=int(cfg_get(e, "steps", 0) or 0),
            tokens=int(cfg_get(e, "tokens", 0) or 0),
            fraction=float(cfg_get(e, "fraction", 0.0) or 0.0),
            changes=tuple(changes),
            lr=lr,
        )
        _check_phase_alone(phase, prec)
        if appended and trigger != "append":
            raise ConfigError(
                f"{key}.trigger",
                trigger,
                "comes after an appended phase; appended phases go last",
                ["append"],
            )
        appended = appended or trigger == "append"
        phases.append(phase)
    recipes = phase_recipes(prec, phases)
    for phase, before, after in zip(phases, recipes, recipes[1:]):
        if before == after and not phase.lr.reset:
            raise ConfigError(
                f"{phase.key}.set",
                dict(phase.changes),
                f"phase {phase.name!r} changes nothing (its recipe is the one before it, no LR reset); "
                "change a GEMM or operand, e.g. set: {fprop: bf16}",
            )
        if not after.quantized and phase.trigger == "sqrt3":
            pass  # the monitor then reports no ratios; harmless
    return phases


def _check_phase_alone(phase: Phase, prec) -> None:
    key = phase.key
    budgets = [b for b in ("steps", "tokens", "fraction") if getattr(phase, b)]
    if phase.trigger == "append":
        if len(budgets) != 1:
            raise ConfigError(
                f"{key}.steps",
                phase.steps,
                "an appended phase needs exactly one budget: steps, tokens or fraction"
                + (
                    f" (set: {', '.join(budgets)}); set the others to 0, e.g. {key}.{budgets[-1]}=0"
                    if budgets
                    else f"; e.g. {key}.steps=100"
                ),
            )
        if phase.steps < 0 or phase.tokens < 0 or not 0.0 <= phase.fraction < 1.0:
            raise ConfigError(f"{key}.{budgets[0]}", getattr(phase, budgets[0]), "must be > 0 (fraction < 1)")
    elif budgets:
        raise ConfigError(
            f"{key}.{budgets[0]}",
            getattr(phase, budgets[0]),
            f"a budget belongs to trigger=append (this phase has trigger={phase.trigger}); drop it",
        )
    if phase.trigger == "sqrt3":
        if not prec.monitor.enabled:
            raise ConfigError(
                f"{key}.trigger",
                "sqrt3",
                "can never fire: the monitor is off; set precision.monitor.enabled=true",
            )
        if phase.patience < 1:
            raise ConfigError(f"{key}.patience", phase.patience, "must be >= 1")
    if phase.trigger == "fraction" and not 0.0 < phase.at < 1.0:
        raise ConfigError(f"{key}.at", phase.at, "trigger=fraction takes a share of train.steps in (0, 1)")
    if phase.trigger in ("step", "tokens") and (phase.at <= 0 or phase.at != int(phase.at)):
        raise ConfigError(f"{key}.at", phase.at, f"trigger={phase.trigger} takes a whole number > 0")
    if phase.trigger == "decay" and phase.at != int(phase.at):
        raise ConfigError(f"{key}.at", phase.at, "trigger=decay takes a whole number of steps (offset)")


def apply_changes(recipe: PrecisionRecipe, changes, rht: bool | None = None) -> PrecisionRecipe:
    """The recipe with each (operand, change) applied in order. `rht`: whether the config asks for the
    RHT (default: the recipe's); it applies while a wgrad operand is quantized, as in from_config."""
    ops = dict(recipe.operands)
    for name, change in changes:
        cur = ops[name]
        fmt = change.get("format", cur.fmt)
        if fmt == "bf16":
            ops[name] = Operand()
            continue
        rounding = change.get("rounding", cur.rounding)
        block_2d = bool(change.get("block_2d", cur.block_2d)) and fmt in BLOCK_2D_FORMATS
        ops[name] = Operand(fmt, rounding, block_2d)
    wanted = recipe.rht if rht is None else rht
    return replace(recipe, **ops, rht=wanted and (ops["wgrad_dy"].quantized or ops["wgrad_x"].quantized))


def phase_recipes(prec, phases: list[Phase]) -> list[PrecisionRecipe]:
    """[base recipe, recipe in phase 1, recipe in phase 2, ...] (each phase on top of the one before)."""
    out = [PrecisionRecipe.from_config(prec)]
    rht = wgrad_rht(prec, operand_overrides(prec))["wgrad_dy"]
    for phase in phases:
        out.append(apply_changes(out[-1], phase.changes, rht))
    return out


def is_qaf(before: PrecisionRecipe, after: PrecisionRecipe) -> bool:
    """QAF: the forward as before (quantized), every dgrad/wgrad operand now in high precision."""
    backward = ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")
    ops = after.operands
    return (
        ops["fprop_x"] == before.fprop_x
        and ops["fprop_w"] == before.fprop_w
        and (before.fprop_x.quantized or before.fprop_w.quantized)
        and not any(ops[n].quantized for n in backward)
    )


# ---- timing: needs the run's length, batch and LR schedule --------------------------------------------


@dataclass(frozen=True)
class RunShape:
    """What the triggers are measured against."""

    steps: int  # train.steps (appended phases included)
    tokens_per_step: int
    optim: object  # optim config (schedule, warmup_steps, decay_fraction, lr, min_lr)


def append_budget(phase: Phase, run: RunShape) -> int:
    if phase.steps:
        return phase.steps
    if phase.tokens:
        return math.ceil(phase.tokens / run.tokens_per_step)
    return int(phase.fraction * run.steps + 0.5)


def base_steps(phases: list[Phase], run: RunShape) -> int:
    """Steps of the base LR schedule: the run minus every appended phase."""
    return run.steps - sum(append_budget(p, run) for p in phases if p.trigger == "append")


def decay_start(optim, total: int) -> int | None:
    """0-based index of the first step whose LR may fall below the peak (None: the schedule never decays)."""
    if optim.schedule == "wsd":
        return total - max(round(total * optim.decay_fraction), 1)
    if optim.schedule == "cosine":
        return int(optim.warmup_steps)
    return None


def switch_step(phase: Phase, phases: list[Phase], run: RunShape) -> int | None:
    """K, the step after which the phase starts; None for sqrt3 (decided by the monitor)."""
    if phase.trigger == "step":
        return int(phase.at)
    if phase.trigger == "fraction":
        return math.ceil(phase.at * run.steps)
    if phase.trigger == "tokens":
        return math.ceil(phase.at / run.tokens_per_step)
    if phase.trigger == "decay":
        start = decay_start(run.optim, base_steps(phases, run))
        return None if start is None else start + int(phase.at)
    if phase.trigger == "append":
        later = phases[phases.index(phase) :]
        return run.steps - sum(append_budget(p, run) for p in later)
    return None


def validate_schedule(prec, run: RunShape) -> list[Phase]:
    """Everything that needs train.steps and the LR schedule: triggers that can never fire, order."""
    phases = phases_from_config(prec)
    base = base_steps(phases, run)
    if phases and base < 1:
        raise ConfigError(
            "precision.schedule",
            f"appended budgets of {run.steps - base} steps",
            f"leave nothing of train.steps={run.steps} for the run before them; raise train.steps",
        )
    last = 0
    for phase in phases:
        if phase.trigger == "decay" and decay_start(run.optim, base) is None:
            raise ConfigError(
                f"{phase.key}.trigger",
                "decay",
                f"can never fire: optim.schedule={run.optim.schedule} has no LR decay; use optim=adamw_wsd "
                "or a step/fraction trigger",
            )
        k = switch_step(phase, phases, run)
        if k is None:
            continue
        if not 1 <= k < run.steps and not phase.legacy:
            raise ConfigError(
                f"{phase.key}.at" if phase.trigger != "append" else f"{phase.key}.steps",
                phase.at if phase.trigger != "append" else append_budget(phase, run),
                f"phase {phase.name!r} would start after step {k}, outside 1..{run.steps - 1} of "
                f"train.steps={run.steps}, so it can never run; move it inside the run",
            )
        if k <= last and not phase.legacy:
            raise ConfigError(
                f"{phase.key}.at",
                phase.at,
                f"phase {phase.name!r} would start after step {k}, not after the phase before it "
                f"(step {last}), so that phase would never run; order the phases by start",
            )
        last = k
    return phases
