"""The Llama family: RMSNorm, RoPE, GQA, SwiGLU, no biases (llmtrain.models.registry.ModelFamily)."""

from functools import cached_property

from llmtrain.errors import ConfigError
from llmtrain.models.registry import ModelFamily
from llmtrain.models.spec import ModelSpec


class LlamaFamily(ModelFamily):
    name = "llama"
    hf_model_type = "llama"
    gemms = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip

    def build_model(self, spec: ModelSpec):
        from llmtrain.models.llama.model import LlamaModel

        return LlamaModel(spec)

    def validate(self, m) -> None:
        if m.get("head_dim") is not None and m.head_dim != m.hidden_size // m.num_attention_heads:
            raise ConfigError(
                "model.head_dim",
                m.head_dim,
                "Llama's head dimension is hidden_size/num_attention_heads; unset it",
            )

    # ---- arithmetic ----------------------------------------------------------------------------------
    def layer_linear_params(self, spec: ModelSpec) -> int:
        """Weights of the GEMMs in one transformer layer (q, k, v, o, gate, up, down)."""
        h, f = spec.hidden_size, spec.ffn_hidden_size
        attn = 2 * h * spec.q_dim + 2 * h * spec.kv_dim
        mlp = 3 * h * f
        return attn + mlp

    def layer_norm_params(self, spec: ModelSpec) -> int:
        return 2 * spec.hidden_size  # input and post-attention RMSNorm

    def num_params(self, spec: ModelSpec) -> int:
        h, v = spec.hidden_size, spec.vocab_size
        per_layer = self.layer_linear_params(spec) + self.layer_norm_params(spec)
        embeddings = v * h * (1 if spec.tie_embeddings else 2)
        return spec.num_layers * per_layer + embeddings + h  # + final norm

    def flops_per_token(self, spec: ModelSpec) -> float:
        """Training FLOPs per token (forward + backward), PaLM convention: 6*N_matmul + 12*L*A*S.

        N_matmul counts every GEMM weight including the output head, not the embedding lookup; the second
        term is the attention score and value products at full (non-causal) cost, as in Megatron's MFU,
        with A = heads * head_dim the attention width (= hidden_size in Llama).
        """
        n_matmul = spec.num_layers * self.layer_linear_params(spec) + spec.vocab_size * spec.hidden_size
        return 6.0 * n_matmul + 12.0 * spec.num_layers * spec.q_dim * spec.seq_length

    # ---- interop -------------------------------------------------------------------------------------
    @cached_property
    def hf(self):
        from llmtrain.models.llama.hf import LlamaHF

        return LlamaHF()

    @cached_property
    def megatron(self):
        from llmtrain.models.llama.megatron import LlamaMegatron

        return LlamaMegatron()


FAMILY = LlamaFamily()
