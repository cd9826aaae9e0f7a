"""The Qwen3 dense family (llmtrain.models.registry.ModelFamily): Llama's formulas plus the q/k norms."""

from functools import cached_property

from llmtrain.errors import ConfigError
from llmtrain.models.llama.family import LlamaFamily
from llmtrain.models.spec import ModelSpec


class Qwen3Family(LlamaFamily):
    name = "qwen3"
    hf_model_type = "qwen3"

    def build_model(self, spec: ModelSpec):
        from llmtrain.models.qwen3.model import Qwen3Model

        return Qwen3Model(spec)

    def validate(self, m) -> None:
        if m.get("head_dim") is not None and (m.head_dim <= 0 or m.head_dim % 2):
            raise ConfigError(
                "model.head_dim", m.head_dim, "must be a positive even number (RoPE rotates pairs)"
            )

    def layer_norm_params(self, spec: ModelSpec) -> int:
        return super().layer_norm_params(spec) + 2 * spec.head_dim  # + q_norm and k_norm

    @cached_property
    def hf(self):
        from llmtrain.models.qwen3.hf import Qwen3HF

        return Qwen3HF()

    @cached_property
    def megatron(self):
        from llmtrain.models.qwen3.megatron import Qwen3Megatron

        return Qwen3Megatron()


FAMILY = Qwen3Family()
