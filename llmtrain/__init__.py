"""llmtrain: recipe-driven LLM pretraining."""

__version__ = "0.1.0"
