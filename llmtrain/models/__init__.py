"""Model descriptions shared by both engines."""

from llmtrain.models.spec import ModelSpec

__all__ = ["ModelSpec"]
