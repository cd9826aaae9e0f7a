"""cluster=slurm: submit with sbatch, print the plan of a dry run, or start the ranks with srun inside an
allocation; inside the job's srun step the ranks train (docs/slurm.md)."""

import os
from pathlib import Path


class SlurmLauncher:
    name = "slurm"

    @staticmethod
    def inside_job() -> bool:
        return "SLURM_JOB_ID" in os.environ

    @staticmethod
    def inside_step() -> bool:
        """In an srun step (the job's ranks), as opposed to an allocation's shell (salloc, a batch script)."""
        return SlurmLauncher.inside_job() and "SLURM_STEP_ID" in os.environ

    def submits(self, cfg) -> bool:
        return not self.inside_job()

    def world(self, cfg) -> int:
        return cfg.cluster.nodes * cfg.cluster.gpus_per_node

    def dispatch(self, cfg, world: int, engine: str) -> bool:
        """- inside an srun step (the job's ranks): train (False);
        - dry_run=true: print the plan (with cluster.preview=true also the sbatch script); nothing runs;
        - no allocation: submit with sbatch;
        - inside an allocation without a step (salloc, or a batch script of your own): run the ranks there
          with srun, at the allocation's size.
        """
        if self.inside_step():
            return False
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if cfg.dry_run:
            from llmtrain.dryrun import dry_run_report
            from llmtrain.launch.allocation import allocation_plan
            from llmtrain.launch.plan import plan

            print(allocation_plan(cfg, run_dir) if self.inside_job() else plan(cfg, overrides, run_dir))
            print(dry_run_report(cfg, world, engine))
            return True
        if self.inside_job():
            from llmtrain.launch.allocation import run_in_allocation

            rc = run_in_allocation(cfg, overrides, run_dir)
            if rc != 0:
                raise SystemExit(rc)
            return True
        submit(cfg, overrides)
        return True

    def after_stop(self, cfg, run_dir) -> None:
        from llmtrain.launch.requeue import after_preemption

        after_preemption(cfg, run_dir)


def submit(cfg, overrides: list[str]) -> None:
    """Submit this run (one sweep point) as a SLURM batch job; print the job id and log path, and return."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from llmtrain.launch import jobs
    from llmtrain.launch.sbatch import submit_run

    hc = HydraConfig.get()
    sweep_index = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    sub = submit_run(cfg, overrides, Path(hc.runtime.output_dir), sweep_index)
    jobs.record(sub, overrides)
    print(
        f"submitted job {sub.job_id} ({sub.name}) | log {sub.log} | rank logs {sub.rank_logs}/ | "
        f"run dir {sub.run_dir} | status: python -m llmtrain.launch status",
        flush=True,
    )
