"""cluster=local: train in this process (or in each rank torchrun started); nothing is submitted."""


class LocalLauncher:
    name = "local"

    @staticmethod
    def inside_job() -> bool:
        return False  # no scheduler: torchrun's WORLD_SIZE is read by launcher.planned_world for any launcher

    def submits(self, cfg) -> bool:
        return False

    def world(self, cfg) -> int:
        # a dry run describes the production layout; a local run is one process unless torchrun started it
        return cfg.cluster.nodes * cfg.cluster.gpus_per_node if cfg.dry_run else 1

    def dispatch(self, cfg, world: int, engine: str) -> bool:
        return False

    def after_stop(self, cfg, run_dir) -> None:
        return None  # the same command resumes from checkpoints/latest; nothing to tell a scheduler
