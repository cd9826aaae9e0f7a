"""The architecture description both engines build from, and its arithmetic (parameters, FLOPs per token).

A ModelSpec is family-neutral numbers (layers, widths, heads, vocab, RoPE, norm); `family` names the model
family (llmtrain.models.registry) that says what those numbers build and owns the formulas.
"""

from dataclasses import dataclass

# Fields that change tensor shapes or their meaning: a checkpoint whose value differs cannot be loaded.
STRUCTURAL = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "head_dim",
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
    family: str = "llama"
    head_dim: int | None = None  # None: hidden_size / num_attention_heads (filled in at construction)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        fields = cls.__dataclass_fields__
        return cls(**{k: cfg[k] for k in fields if k in cfg})

    @property
    def model_family(self):
        """The family's spec object (llmtrain.models.registry.ModelFamily)."""
        from llmtrain.models.registry import get_family

        return get_family(self.family)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.head_dim

    def layer_linear_params(self) -> int:
        """Weights of the GEMMs in one transformer layer (the family's quantized GEMMs)."""
        return self.model_family.layer_linear_params(self)

    def num_params(self) -> int:
        return self.model_family.num_params(self)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward); the family's formula."""
        return self.model_family.flops_per_token(self)
