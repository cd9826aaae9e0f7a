"""Model families: `model.family` -> the one object that knows a family (torchtitan's ModelSpec idea).

A family is a package `llmtrain/models/<name>/` whose `FAMILY` is a ModelFamily: the reference nn.Module,
its parameter/FLOPs formulas, the GEMMs the torch engine quantizes, the Hugging Face adapter and the
Megatron-Core mapping. Engines, convert, eval, the dry run and validation ask for it here instead of knowing
a family. Families load lazily, so reading a config does not import a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llmtrain.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from llmtrain.models.spec import ModelSpec

# model.family -> the package holding its FAMILY.
FAMILIES = {
    "llama": "llmtrain.models.llama.family",
    "qwen3": "llmtrain.models.qwen3.family",
}


class ModelFamily:
    """What a family provides. Subclass it in `llmtrain/models/<name>/family.py` and register the module."""

    name: str
    hf_model_type: str  # config.json's model_type
    gemms: tuple[str, ...]  # per-layer linears (paths inside a decoder layer) the torch engine quantizes

    def build_model(self, spec: ModelSpec) -> nn.Module:  # the reference model, parameters uninitialized
        raise NotImplementedError

    def validate(self, m) -> None:
        """Family rules on the `model:` config section (ConfigError naming the key)."""

    def layer_linear_params(self, spec: ModelSpec) -> int:
        raise NotImplementedError

    def num_params(self, spec: ModelSpec) -> int:
        raise NotImplementedError

    def flops_per_token(self, spec: ModelSpec) -> float:
        raise NotImplementedError

    @property
    def hf(self):
        """The Hugging Face adapter (names, shapes, config translation); see llama/hf.py."""
        raise NotImplementedError

    @property
    def megatron(self):
        """The Megatron-Core mapping (TransformerConfig fields, layer spec, weight layout); see llama/megatron.py."""
        raise NotImplementedError


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError("model.family", name, "unknown model family", sorted(FAMILIES))
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_for_hf_model_type(model_type: str) -> ModelFamily | None:
    for name in FAMILIES:
        family = get_family(name)
        if family.hf_model_type == model_type:
            return family
    return None
