"""Model descriptions shared by both engines, and the registry of model families."""

from llmtrain.models.registry import FAMILIES, ModelFamily, get_family
from llmtrain.models.spec import ModelSpec

__all__ = ["FAMILIES", "ModelFamily", "ModelSpec", "get_family"]
