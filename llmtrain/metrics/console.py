"""Console progress: a rich progress bar on a terminal, plain lines otherwise (logs, CI, SLURM)."""

import sys


def _fmt(record: dict) -> str:
    parts = [
        f"step {record['step']}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"tok/s {record['tokens_per_s']:,.0f}",
    ]
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("mem_gib") is not None:
        parts.append(f"mem {record['mem_gib']:.1f}GiB")
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.4f}")
    return " | ".join(parts)


class Console:
    def __init__(self, style: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.progress = None
        if enabled and style == "rich" and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)
            self.progress.start()

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], description=_fmt(record))
        else:
            print(_fmt(record), flush=True)

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
