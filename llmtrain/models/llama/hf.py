"""Hugging Face LlamaForCausalLM <-> LlamaModel: tensor names, shapes and config translation.

LlamaModel uses HF's names without the `model.` prefix and the same rotate-half RoPE, so weights map one to
one; only names, the tied output head and the config need care. transformers is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.spec import ModelSpec


def transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the dev extra
        raise UserError("Hugging Face conversion needs transformers: pip install 'llmtrain[hf]'") from e
    return transformers


def hf_rope(cfg) -> tuple[float, dict]:
    """(rope_theta, rope params) for transformers 5 (`rope_parameters`) and 4 (`rope_theta`/`rope_scaling`)."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params
    scaling = getattr(cfg, "rope_scaling", None) or {}
    return float(getattr(cfg, "rope_theta", 10000.0)), {
        "rope_type": scaling.get("rope_type", "default")
    } | scaling


class LlamaHF:
    """The HF adapter of a family; subclasses change the class names and add tensors or checks."""

    family = "llama"
    title = "Llama"  # in messages
    config_class = "LlamaConfig"
    architecture = "LlamaForCausalLM"
    free_head_dim = False  # Llama: head_dim = hidden_size / heads

    # ---- names and shapes ----------------------------------------------------------------------------
    def layer_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """One decoder layer's tensors (names inside `layers.<i>.`)."""
        h, f = spec.hidden_size, spec.ffn_hidden_size
        q, kv = spec.q_dim, spec.kv_dim
        return {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }

    def expected_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """The state dict the family's model stores (llmtrain names), computed without allocating it."""
        h, v = spec.hidden_size, spec.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, h)}
        layer = self.layer_shapes(spec)
        for i in range(spec.num_layers):
            shapes |= {f"layers.{i}.{k}": s for k, s in layer.items()}
        shapes["norm.weight"] = (h,)
        if not spec.tie_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    @staticmethod
    def to_llmtrain_name(name: str) -> str | None:
        """HF name -> llmtrain name; None for buffers that old checkpoints carry."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        return name.removeprefix("model.")

    @staticmethod
    def to_hf_name(name: str) -> str:
        return name if name.startswith("lm_head.") else "model." + name

    # ---- config translation --------------------------------------------------------------------------
    def unsupported(self, raw: dict) -> list[str]:
        """What in a raw config.json (transformers 4 or 5) this family's model does not implement."""
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        rope_type = (
            rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        )
        problems = []
        if rope_type != "default":
            problems.append(
                f"rope scaling {rope_type!r} (llmtrain's {self.title} implements plain RoPE only)"
            )
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            problems.append(f"attention/MLP biases (llmtrain's {self.title} has none)")
        if raw.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={raw['hidden_act']!r} (only silu/SwiGLU)")
        heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
        if not self.free_head_dim and heads and hidden and raw.get("head_dim") not in (None, hidden // heads):
            problems.append(f"head_dim={raw['head_dim']} != hidden_size/num_attention_heads")
        return problems

    # config.json keys read here, by the JSON type they must have (absent keys take transformers' defaults)
    SIZE_KEYS = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    )
    OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim")  # null: derived from the others
    NUMBER_KEYS = ("rms_norm_eps", "rope_theta", "initializer_range")
    BOOL_KEYS = ("tie_word_embeddings",)

    def check_types(self, raw: dict, path: Path) -> None:
        """One line naming the file, the key and the value where a key read here has the wrong JSON type
        (transformers takes any value, and the arithmetic on it fails later with a traceback)."""

        def bad(key: str, want: str):
            return CheckpointError(
                f"{path}: {key}={json.dumps(raw[key])} must be {want}; fix it in config.json"
            )

        for key in self.SIZE_KEYS + self.OPTIONAL_SIZE_KEYS:
            value = raw.get(key)
            if key not in raw or (value is None and key in self.OPTIONAL_SIZE_KEYS):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "a positive integer" + (" or null" if key in self.OPTIONAL_SIZE_KEYS else ""))
        for key in self.NUMBER_KEYS:
            if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int | float)):
                raise bad(key, "a number")
        for key in self.BOOL_KEYS:
            if key in raw and not isinstance(raw[key], bool):
                raise bad(key, "true or false")

    def check_supported(self, raw: dict, path: Path) -> None:
        if problems := self.unsupported(raw):
            raise UserError(f"{path}: unsupported {self.title} variant: {'; '.join(problems)}")

    def parse_config(self, raw: dict, path: Path):
        """A checked raw config.json -> the transformers config object."""
        self.check_types(raw, path)
        self.check_supported(raw, path)
        try:
            return getattr(transformers(), self.config_class).from_dict(raw)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a valid {self.config_class} ({e})") from e

    def model_config(self, cfg, name: str | None = None) -> dict:
        """transformers config -> the `model:` section of an llmtrain config (ModelConfig fields)."""
        theta, _ = hf_rope(cfg)
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None)
        if head_dim == int(cfg.hidden_size) // heads:
            head_dim = None  # the default: config.yaml keeps model.head_dim unset, as a recipe would
        return {
            "name": name or "hf_import",
            "family": self.family,
            "num_layers": int(cfg.num_hidden_layers),
            "hidden_size": int(cfg.hidden_size),
            "ffn_hidden_size": int(cfg.intermediate_size),
            "num_attention_heads": heads,
            "num_query_groups": int(cfg.num_key_value_heads or heads),
            "head_dim": int(head_dim) if head_dim else None,
            "vocab_size": int(cfg.vocab_size),
            "seq_length": int(cfg.max_position_embeddings),
            "rope_theta": theta,
            "norm_eps": float(cfg.rms_norm_eps),
            "tie_embeddings": bool(cfg.tie_word_embeddings),
            "init_std": float(getattr(cfg, "initializer_range", 0.02)),
        }

    def config_kwargs(self, spec: ModelSpec) -> dict:
        return dict(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.ffn_hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_query_groups,
            head_dim=spec.head_dim,
            max_position_embeddings=spec.seq_length,
            rms_norm_eps=spec.norm_eps,
            rope_theta=spec.rope_theta,
            tie_word_embeddings=spec.tie_embeddings,
            initializer_range=spec.init_std,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )

    def hf_config(self, spec: ModelSpec, dtype=None, bos_token_id=None, eos_token_id=None, pad_token_id=None):
        """ModelSpec -> the transformers config of the family's *ForCausalLM."""
        cfg = getattr(transformers(), self.config_class)(
            **self.config_kwargs(spec),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            architectures=[self.architecture],
        )
        if dtype is not None:
            cfg.dtype = dtype  # written as "dtype" (transformers 5) / "torch_dtype" (4)
        return cfg
