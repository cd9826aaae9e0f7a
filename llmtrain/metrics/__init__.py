"""Run metrics: console progress, metrics.jsonl, wandb; FLOPs/MFU accounting."""

from llmtrain.metrics.logger import MetricsLogger

__all__ = ["MetricsLogger"]
