"""The engine-agnostic training loop, LR schedules and checkpointing."""
