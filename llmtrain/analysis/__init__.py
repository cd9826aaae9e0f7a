"""Reading and comparing finished runs (metrics.jsonl + config.yaml + Hydra overrides)."""
