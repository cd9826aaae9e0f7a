"""Learning-rate schedules (Megatron conventions): linear warmup, then cosine / WSD / constant."""

import math

SCHEDULES = ["cosine", "wsd", "constant"]


def learning_rate(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    total: int,
    schedule: str,
    decay_fraction: float = 0.2,
) -> float:
    """LR for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(round(total * decay_fraction), 1)
        decay_start = total - decay_steps
        if step < decay_start:
            return lr
        progress = min((step - decay_start) / decay_steps, 1.0)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r} (allowed: {', '.join(SCHEDULES)})")


def schedule_from_config(optim, total_steps: int):
    def lr_at(step: int) -> float:
        return learning_rate(
            step,
            lr=optim.lr,
            min_lr=optim.min_lr,
            warmup=optim.warmup_steps,
            total=total_steps,
            schedule=optim.schedule,
            decay_fraction=optim.decay_fraction,
        )

    return lr_at
