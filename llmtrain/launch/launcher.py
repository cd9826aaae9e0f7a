"""How a run reaches its ranks: one `Launcher` per `cluster.type`, chosen once from the config.

A launcher answers what cli.py used to read from environment variables itself: whether this process hands
the run to a scheduler (`submits`), how many ranks a run it plans has (`world`), and what to do instead of
training here (`dispatch`). The environment side, "which launcher's job is this process in", is asked of
every launcher (`placed_by`): a hand-submitted slurm/train.sbatch runs its ranks with the default
cluster=local, yet they take their world size from SLURM and write SLURM's stop record.

Adding a launcher: a module in llmtrain/launch/ with a class that has these methods, one line in LAUNCHERS,
a configs/cluster/<name>.yaml with `type: <name>`, and tests (tests/unit/test_launcher.py shows how).
Keep this module free of heavy imports: config validation reads LAUNCHERS.
"""

import importlib
import os
from typing import Protocol


class Launcher(Protocol):
    name: str

    @staticmethod
    def inside_job() -> bool:
        """This process runs inside one of this launcher's jobs (its environment says so)."""

    def submits(self, cfg) -> bool:
        """This process hands the run to a scheduler and returns: no fit check, no run dir planned here."""

    def world(self, cfg) -> int:
        """Ranks of the run this process plans, when no launcher's environment gives the world size."""

    def dispatch(self, cfg, world: int, engine: str) -> bool:
        """Do what this launcher does instead of training here (submit, print a plan, start ranks);
        True when that was all, False when this process trains."""

    def after_stop(self, cfg, run_dir) -> None:
        """A signal stopped training before train.steps: leave the record the job needs (e.g. requeue)."""


# cluster.type -> "module:class", imported on use. placed_by tries them in this order (local never matches).
LAUNCHERS = {
    "local": "llmtrain.launch.local:LocalLauncher",
    "slurm": "llmtrain.launch.slurm:SlurmLauncher",
}


def launcher_class(name: str) -> type:
    module, _, cls = LAUNCHERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def select(cfg) -> Launcher:
    """The launcher of cfg.cluster.type (config validation has checked that it is one of LAUNCHERS)."""
    return launcher_class(cfg.cluster.type)()


def placed_by() -> Launcher | None:
    """The launcher whose job this process runs in, whatever cluster.type says; None outside any job."""
    for name in LAUNCHERS:
        cls = launcher_class(name)
        if cls.inside_job():
            return cls()
    return None


def planned_world(cfg) -> int:
    """World size: torch.distributed's env:// WORLD_SIZE (torchrun) or the job this process runs in (srun's
    SLURM_NTASKS), else the configured launcher's plan."""
    if "WORLD_SIZE" in os.environ or placed_by() is not None:
        from llmtrain.dist import dist_info_from_env

        return dist_info_from_env().world_size
    return select(cfg).world(cfg)


def after_preemption(cfg, run_dir) -> None:
    """The train loop's hook after a signal stopped it: the job this process runs in keeps its record."""
    if (launcher := placed_by()) is not None:
        launcher.after_stop(cfg, run_dir)
