"""Megatron engine checkpoints for `export` (and the plan for `import --engine megatron`).

The per-tensor layout (fused QKV grouped per KV group, fused [gate; up] fc1, norms fused into TE linears, TP
splits) lives in the engine, `llmtrain.engines.megatron_engine.mapping`; this module only adapts a
Megatron-Core `dist_checkpointing` checkpoint to it:

  * the engine writes `<step_dir>/megatron/` (torch_dist format); its tensors are stored with global shapes,
    so a checkpoint of any TP/PP layout reads back whole on one process (`load_tensors_metadata` + `load`);
  * Megatron-Core stores a transformer block's layers stacked (`decoder.layers.<name>` of shape [L, ...]) or
    per layer (`decoder.layers.<i>.<name>`): `unstack_layers` gives per-layer keys either way;
  * the optimizer, RNG and TE `_extra_state` entries are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.spec import ModelSpec

SUBDIR = "megatron"  # llmtrain.engines.megatron_engine.checkpoint.SUBDIR
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_PER_LAYER = re.compile(r"^decoder\.layers\.\d+\.")
# Megatron-Core's local (non-TE) layer spec keeps the norms as separate modules.
_LOCAL_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def unstack_layers(state: dict, num_layers: int) -> dict[str, torch.Tensor]:
    """Model tensors only, per-layer keys, TE names: drops `model.`/`module.` prefixes, non-model entries and
    `_extra_state`, splits layer-stacked tensors, renames local-spec norms to their TE-fused names."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        if not isinstance(t, torch.Tensor) or "_extra_state" in key or not key.startswith(MODEL_PREFIXES):
            continue
        if key.startswith("decoder.layers.") and not _PER_LAYER.match(key):
            rest = key.removeprefix("decoder.layers.")
            if t.shape[0] != num_layers:
                raise CheckpointError(
                    f"Megatron tensor {key} stacks {t.shape[0]} layers but model.num_layers={num_layers};"
                    " the checkpoint's config.yaml does not match its weights"
                )
            out |= {f"decoder.layers.{i}.{rest}": t[i] for i in range(num_layers)}
        else:
            out[key] = t
    for key in list(out):
        head, _, tail = key.partition(".layers.")
        for local, te in _LOCAL_NORMS.items():
            if tail.endswith("." + local) and head == "decoder":
                out[key.removesuffix(local) + te] = out.pop(key)
    return out


def from_megatron(state: dict, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Full Megatron-Core GPTModel tensors (stacked or per-layer keys) -> llmtrain state dict (tied lm_head
    dropped, vocab padding rows removed)."""
    from llmtrain.engines.megatron_engine import mapping

    mg = unstack_layers(state, spec.num_layers)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in mg:
            mg[key] = mg[key][: spec.vocab_size]
    try:
        ref = mapping.megatron_to_reference(mg, spec)
    except KeyError as e:
        raise CheckpointError(
            f"Megatron checkpoint has no tensor {e.args[0]}; it is incomplete or not a GPT model"
        ) from None
    if spec.tie_embeddings:
        ref.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in ref.items()}


def dist_checkpoint_dir(step_dir: Path) -> Path:
    for cand in (step_dir / SUBDIR, step_dir):
        if (cand / "metadata.json").is_file():
            return cand
    raise CheckpointError(
        f"{step_dir}: no Megatron-Core checkpoint ({SUBDIR}/metadata.json missing); the checkpoint is incomplete"
    )


def load_model_state(step_dir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Model weights of a Megatron engine checkpoint (any TP/PP layout) as a full llmtrain state dict (FP32)."""
    from llmtrain.convert.io import read_config, verify_files

    step_dir = Path(step_dir)
    if manifest.get("engine") != "megatron":
        raise CheckpointError(
            f"{step_dir}: manifest.json names engine {manifest.get('engine')!r}; expected torch or megatron"
        )
    spec = ModelSpec.from_config(read_config(step_dir).model)
    ckpt = dist_checkpoint_dir(step_dir)
    verify_files(step_dir, manifest, [n for n in manifest.get("files", {}) if n.startswith(f"{SUBDIR}/")])
    try:
        from megatron.core import dist_checkpointing
    except ImportError as e:
        raise UserError(
            "reading a Megatron engine checkpoint needs megatron-core: pip install megatron-core"
        ) from e
    owns_group = _ensure_process_group()
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
        wanted = {
            k: v for k, v in metadata.items() if k.startswith(MODEL_PREFIXES) and "_extra_state" not in k
        }
        if not wanted:
            raise CheckpointError(f"{ckpt}: no model tensors in the Megatron checkpoint")
        state = dist_checkpointing.load(wanted, str(ckpt), validate_access_integrity=False)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()
    return {k: v.float().cpu() for k, v in from_megatron(state, spec).items()}


def _ensure_process_group() -> bool:
    """dist_checkpointing needs a process group; a single-process gloo group serves a conversion."""
    import os
    import socket

    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    return True


def import_to_megatron(
    files, spec: ModelSpec, out: Path, *, config: dict, tp: int, pp: int, force: bool, extra
):
    """HF weights -> a Megatron engine checkpoint (dist_checkpointing). Not implemented yet.

    The engine already starts from HF weights in any TP/PP layout (`train.init_from=HF_DIR engine=megatron`:
    each rank takes its shard through mapping.tp_shard), and its first checkpoint is then a Megatron one. A
    standalone import would run the engine under torchrun (tp*pp GPUs), load_reference_state_dict, and save
    through the loop's CheckpointManager layout with step 0.
    """
    raise UserError(
        "import --engine megatron is not implemented; start the Megatron engine straight from the HF"
        " directory with train.init_from=HF_DIR (any parallel.tp/pp), or import with --engine torch"
    )
