"""Optional wandb logging: offline by default; silently absent when wandb is not installed."""

import importlib.util
from pathlib import Path


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, resolved: dict):
        self.run = None
        mode = cfg.logging.wandb.mode
        if mode == "disabled" or importlib.util.find_spec("wandb") is None:
            self.note = (
                "wandb: disabled" if mode == "disabled" else "wandb: not installed (pip install wandb)"
            )
            return
        import wandb

        w = cfg.logging.wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or run_dir.name,
            mode=mode,
            dir=str(run_dir),
            config=resolved,
            id=_stable_id(run_dir),
            resume="allow",
        )
        self.note = f"wandb: {mode} ({self.run.dir})"

    def log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(record, step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _stable_id(run_dir: Path) -> str:
    """Same wandb run id for the same run dir, so a resumed run continues its curves."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
