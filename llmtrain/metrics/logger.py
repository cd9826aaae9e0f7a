"""One object the loop logs through: console + metrics.jsonl + wandb (rank 0 only)."""

from pathlib import Path

from llmtrain.metrics.console import Console
from llmtrain.metrics.jsonl import JsonlWriter
from llmtrain.metrics.wandb_logger import WandbLogger


class MetricsLogger:
    def __init__(self, cfg, run_dir: Path, resolved: dict, *, is_main: bool, start_step: int):
        self.is_main = is_main
        self.console = Console(cfg.logging.console, cfg.train.steps, start_step, enabled=is_main)
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl", start_step) if is_main else None
        self.wandb = WandbLogger(cfg, run_dir, resolved) if is_main else None
        if self.wandb is not None:
            self.console.info(self.wandb.note)

    def log_step(self, record: dict, *, echo: bool) -> None:
        if not self.is_main:
            return
        self.jsonl.write(record)
        self.wandb.log(record)
        if echo:
            self.console.step(record)

    def info(self, text: str) -> None:
        self.console.info(text)

    def close(self) -> None:
        if self.is_main:
            self.console.close()
            self.jsonl.close()
            self.wandb.close()
