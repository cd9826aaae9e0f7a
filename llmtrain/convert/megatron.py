"""Megatron-Core side of the conversion: llmtrain/HF Llama tensors <-> Megatron-Core GPTModel tensors.

What is here (pure tensor code, unit-tested on the CPU):
  * `to_mcore` / `from_mcore`: full (unsharded, "global") tensors between llmtrain names and Megatron-Core
    GPTModel names: fused QKV interleaved per query group, fused gate/up `linear_fc1`, layer norms fused into
    TE's `linear_qkv` / `linear_fc1` (`layer_norm_weight`) or separate (local spec), vocab padded for TP;
  * `tp_shard` / `tp_unshard`: how each global tensor splits over tensor-parallel ranks (what a TP rank's
    parameter holds), for engines that fill parameters directly;
  * `load_model_state`: export of a Megatron engine checkpoint (Megatron-Core `dist_checkpointing`, any TP/PP
    layout: its tensors are stored with global shapes) -> llmtrain state dict, via `load_plain_tensors`.

What needs the Megatron engine (issue: Megatron engine) and is not done yet: `import_to_megatron`, which
must write a dist checkpoint whose keys match the engine's `sharded_state_dict()` exactly (prefix, stacked
vs per-layer keys, `_extra_state`), then the GPU test (tests/gpu/test_convert_megatron.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.spec import ModelSpec

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_MC_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padding of the embedding/output rows (make_vocab_size_divisible_by * TP)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _names(fused_norms: bool) -> dict[str, str]:
    """llmtrain per-layer names that map one to one (norms, output projections)."""
    norms = (
        {
            "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
        }
        if fused_norms
        else {
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
        }
    )
    return norms | {
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    }


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """[q; k; v] in Megatron's layout: per query group, that group's query heads, then its k, then its v."""
    g, d, h = spec.num_query_groups, spec.head_dim, q.shape[-1]
    per = spec.num_attention_heads // g
    return torch.cat([q.view(g, per * d, h), k.view(g, d, h), v.view(g, d, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, h = spec.num_query_groups, spec.head_dim, qkv.shape[-1]
    per = spec.num_attention_heads // g
    x = qkv.view(g, (per + 2) * d, h)
    q, k, v = x.split([per * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def to_mcore(
    state: dict[str, torch.Tensor], spec: ModelSpec, padded_vocab: int | None = None, fused_norms: bool = True
) -> dict[str, torch.Tensor]:
    """llmtrain state dict (full tensors) -> Megatron-Core GPTModel state dict (full tensors, per-layer keys)."""
    vp = padded_vocab or spec.vocab_size
    names = _names(fused_norms)
    out = {"embedding.word_embeddings.weight": _pad_rows(state["embed_tokens.weight"], vp)}
    for i in range(spec.num_layers):
        p, m = f"layers.{i}.", f"decoder.layers.{i}."
        for src, dst in names.items():
            out[m + dst] = state[p + src]
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            state[p + "self_attn.q_proj.weight"],
            state[p + "self_attn.k_proj.weight"],
            state[p + "self_attn.v_proj.weight"],
            spec,
        )
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]
        )
    out["decoder.final_layernorm.weight"] = state["norm.weight"]
    if not spec.tie_embeddings:
        out["output_layer.weight"] = _pad_rows(state["lm_head.weight"], vp)
    return out


def unstack_layers(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Normalize a Megatron state dict: drop `model.`/`module.` prefixes and `_extra_state`, and split layer-stacked
    keys (`decoder.layers.<name>` of shape [num_layers, ...], what dist_checkpointing stores) into per-layer keys."""
    out = {}
    for key, t in state.items():
        for prefix in ("model.", "module."):
            key = key.removeprefix(prefix)
        if "_extra_state" in key or not isinstance(t, torch.Tensor):
            continue
        if key.startswith("decoder.layers.") and not _MC_LAYER.match(key):
            rest = key.removeprefix("decoder.layers.")
            if t.shape[0] != num_layers:
                raise CheckpointError(
                    f"Megatron tensor {key} has {t.shape[0]} stacked layers, the config says {num_layers}"
                )
            out |= {f"decoder.layers.{i}.{rest}": t[i] for i in range(num_layers)}
        else:
            out[key] = t
    return out


def from_mcore(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Megatron-Core GPTModel state dict (full tensors; stacked or per-layer keys) -> llmtrain state dict."""
    state = unstack_layers(state, spec.num_layers)
    fused = any(k.endswith("linear_qkv.layer_norm_weight") for k in state)
    names = _names(fused)
    try:
        out = {"embed_tokens.weight": state["embedding.word_embeddings.weight"][: spec.vocab_size]}
        for i in range(spec.num_layers):
            p, m = f"layers.{i}.", f"decoder.layers.{i}."
            for dst, src in names.items():
                out[p + dst] = state[m + src]
            q, k, v = split_qkv(state[m + "self_attention.linear_qkv.weight"], spec)
            out |= {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
            }
            gate, up = state[m + "mlp.linear_fc1.weight"].chunk(2)
            out |= {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
        out["norm.weight"] = state["decoder.final_layernorm.weight"]
        if not spec.tie_embeddings:
            out["lm_head.weight"] = state["output_layer.weight"][: spec.vocab_size]
    except KeyError as e:
        raise CheckpointError(
            f"Megatron checkpoint is missing tensor {e.args[0]}; it is incomplete or not a GPT model"
        ) from e
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# Tensor-parallel layout of one global tensor (Megatron-Core's ColumnParallel/RowParallel/VocabParallel).


def tp_axis(mcore_name: str) -> int | None:
    """Axis a Megatron-Core tensor is split along over TP ranks; None if replicated."""
    if mcore_name.endswith(
        ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
    ):
        return 0
    if mcore_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def tp_shard(mcore_name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The part of global tensor `t` that TP rank `rank` of `size` holds. linear_fc1 holds [gate_r; up_r]."""
    axis = tp_axis(mcore_name)
    if axis is None or size == 1:
        return t
    if mcore_name.endswith("linear_fc1.weight"):
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    if t.shape[axis] % size:
        raise UserError(f"{mcore_name}: dim {axis} of size {t.shape[axis]} does not split over tp={size}")
    return t.chunk(size, dim=axis)[rank]


def tp_unshard(mcore_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    axis = tp_axis(mcore_name)
    if axis is None or len(shards) == 1:
        return shards[0]
    if mcore_name.endswith("linear_fc1.weight"):
        parts = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([g for g, _ in parts]), torch.cat([u for _, u in parts])])
    return torch.cat(shards, dim=axis)


def pp_layers(num_layers: int, pp: int, rank: int) -> range:
    """Global indices of the layers pipeline stage `rank` holds (even split, as Megatron-Core without VPP)."""
    if num_layers % pp:
        raise UserError(f"model.num_layers={num_layers} does not split over parallel.pp={pp}")
    n = num_layers // pp
    return range(rank * n, (rank + 1) * n)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints of the Megatron engine


def _dist_checkpoint_dir(step_dir: Path, manifest: dict) -> Path:
    for cand in (manifest.get("dist_checkpoint"), ".", "model", "dist"):
        if cand and (step_dir / cand / "metadata.json").is_file():
            return step_dir / cand
    raise CheckpointError(
        f"{step_dir}: engine={manifest.get('engine')!r} checkpoint has no Megatron dist_checkpointing"
        " directory (metadata.json); the checkpoint is incomplete"
    )


def load_model_state(step_dir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Model tensors of a Megatron engine checkpoint (any TP/PP layout) as a full llmtrain state dict."""
    from llmtrain.convert.io import read_config

    if manifest.get("engine") != "megatron":
        raise CheckpointError(f"{step_dir}: unknown engine {manifest.get('engine')!r} in manifest.json")
    spec = ModelSpec.from_config(read_config(step_dir).model)
    ckpt = _dist_checkpoint_dir(Path(step_dir), manifest)
    try:
        from megatron.core import dist_checkpointing
    except ImportError as e:
        raise UserError(
            "reading a Megatron engine checkpoint needs megatron-core: pip install megatron-core"
        ) from e
    _ensure_process_group()
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    model_keys = {
        k: v
        for k, v in metadata.items()
        if not k.startswith(("optimizer.", "optim", "rng")) and "_extra_state" not in k
    }
    state = dist_checkpointing.load(model_keys, str(ckpt), validate_access_integrity=False)
    return from_mcore(state, spec)


def _ensure_process_group() -> None:
    """dist_checkpointing needs a process group; a single-process gloo group serves conversion on a CPU."""
    import os

    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)


def import_to_megatron(
    files, spec: ModelSpec, out: Path, *, config: dict, tp: int, pp: int, force: bool, extra
):
    """HF weights -> Megatron engine checkpoint. Needs the Megatron engine's checkpoint keys; not available yet.

    Plan: state = to_mcore(llmtrain tensors, spec, padded_vocab_size(V, tp)); wrap each global tensor in a
    ShardedTensor with the key the engine's GPTModel.sharded_state_dict() uses (dist_checkpointing stores
    global shapes, so one single-process save loads into any TP/PP layout); write config.yaml with
    parallel.tp/pp and manifest.json (engine: megatron) through io.write_manifest, in an atomic_output_dir.
    """
    raise UserError(
        "import into the Megatron engine is not available yet (it needs the Megatron engine's checkpoint"
        " layout); import with --engine torch, or train with train.init_from=HF_DIR"
    )


@torch.no_grad()
def fill_mcore_params(
    named_params: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    layer_offset: int = 0,
) -> int:
    """Copy global Megatron-Core tensors (from `to_mcore`) into this rank's parameters.

    `named_params`: the rank's GPTModel.named_parameters() (local layer indices, TP-local shapes);
    `layer_offset`: global index of this pipeline stage's first layer. Returns how many tensors were copied;
    raises on a missing tensor or a shape that does not match the TP split.
    """
    copied = 0
    for name, param in named_params.items():
        key = name
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        m = _MC_LAYER.match(key)
        if m:
            key = f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
        if key not in global_state:
            raise CheckpointError(f"init_from: no tensor for Megatron parameter {name} (looked for {key})")
        part = tp_shard(key, global_state[key], tp_rank, tp_size)
        if tuple(part.shape) != tuple(param.shape):
            raise CheckpointError(
                f"init_from: shape mismatch for {name}: checkpoint {list(part.shape)} vs model {list(param.shape)}"
            )
        param.copy_(part)
        copied += 1
    return copied
