"""Architecture arithmetic for a Llama-style decoder: parameter count and FLOPs per token.

Both engines build the same architecture from this description (RMSNorm, RoPE, GQA, SwiGLU, no biases).
"""

from dataclasses import dataclass

# Fields that change tensor shapes or their meaning: a checkpoint whose value differs cannot be loaded.
STRUCTURAL = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "tie_embeddings",
)


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    seq_length: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    name: str = "custom"

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        fields = cls.__dataclass_fields__
        return cls(**{k: cfg[k] for k in fields if k in cfg})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.head_dim

    def layer_linear_params(self) -> int:
        """Weights of the GEMMs in one transformer layer (q, k, v, o, gate, up, down)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        attn = h * h + 2 * h * self.kv_dim + h * h
        mlp = 3 * h * f
        return attn + mlp

    def num_params(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        per_layer = self.layer_linear_params() + 2 * h  # + two RMSNorm weights
        embeddings = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h  # + final norm

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM convention: 6*N_matmul + 12*L*H*S.

        N_matmul counts every GEMM weight including the output head, not the embedding lookup; the second
        term is the attention score and value products at full (non-causal) cost, as in Megatron's MFU.
        """
        n_matmul = self.num_layers * self.layer_linear_params() + self.vocab_size * self.hidden_size
        return 6.0 * n_matmul + 12.0 * self.num_layers * self.hidden_size * self.seq_length
