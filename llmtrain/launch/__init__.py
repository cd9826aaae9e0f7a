"""How runs reach their ranks: `launcher.py` picks a launcher per cluster.type (local, slurm); the SLURM one
submits, plans, runs inside allocations and requeues (docs/slurm.md). Light to import: no torch, no Hydra."""

from llmtrain.launch.launcher import Launcher, after_preemption, placed_by, planned_world, select

__all__ = ["Launcher", "after_preemption", "placed_by", "planned_world", "select"]
