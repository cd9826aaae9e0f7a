"""Megatron engine checkpoints: read them for `export`, write them for `import --engine megatron`.

The per-tensor layout (fused QKV grouped per KV group, fused [gate; up] fc1, norms fused into TE linears, TP
splits) lives with the model family, `llmtrain/models/<family>/megatron.py`; this module only adapts a
Megatron-Core `dist_checkpointing` checkpoint to it:

  * the engine writes `<step_dir>/megatron/` (torch_dist format); its tensors are stored with global shapes,
    so a checkpoint of any TP/PP layout reads back whole on one process (`load_tensors_metadata` + `load`);
  * Megatron-Core stores a transformer block's layers stacked (`decoder.layers.<name>` of shape [L, ...]) or
    per layer (`decoder.layers.<i>.<name>`): `unstack_layers` gives per-layer keys either way;
  * the optimizer, RNG and TE `_extra_state` entries are skipped;
  * an import writes the same format from one process: every TP rank's slice (the family's `tp_shard`) as the
    ShardedTensor the engine's GPTModel would give it (`sharded_tensors`), model weights only, FP32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from pathlib import Path
from unittest import mock

import torch

from llmtrain import checkpoint_format as fmt
from llmtrain.convert import hf
from llmtrain.convert.io import write_config_and_files
from llmtrain.dist import DistInfo, close_process_group, init_process_group
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
    mg = unstack_layers(state, spec.num_layers)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in mg:
            mg[key] = mg[key][: spec.vocab_size]
    try:
        ref = spec.model_family.megatron.to_reference(mg, spec)
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
    """Model weights of a Megatron engine checkpoint (any TP/PP layout) as a full llmtrain state dict (FP32);
    the step dir is verified by the caller (api.load_model_state)."""
    step_dir = Path(step_dir)
    if manifest.get("engine") != "megatron":
        raise CheckpointError(
            f"{step_dir}: manifest.json names engine {manifest.get('engine')!r}; expected torch or megatron"
        )
    spec = ModelSpec.from_config(fmt.read_config(step_dir).model)
    ckpt = dist_checkpoint_dir(step_dir)
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
            close_process_group()
    return {k: v.float().cpu() for k, v in from_megatron(state, spec).items()}


def _ensure_process_group() -> bool:
    """dist_checkpointing needs a process group; a single-process gloo group serves a conversion."""
    return init_process_group(DistInfo(), "gloo", single_process=True)


_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def check_layout(spec: ModelSpec, tp: int, pp: int):
    """The engine's own layout rules (heads, KV groups, vocab and layers divisible...) for --tp/--pp."""
    from omegaconf import OmegaConf

    from llmtrain.config.schema import ParallelConfig
    from llmtrain.engines.megatron_engine.settings import resolve_layout

    return resolve_layout(OmegaConf.structured(ParallelConfig(tp=tp, pp=pp)), spec, world_size=tp * pp)


def _sharded(key: str, data: torch.Tensor, layer_axis: list, *tp_axis: tuple[int, int, int]):
    from megatron.core.dist_checkpointing import ShardedTensor

    return ShardedTensor.from_rank_offsets(
        key, data.contiguous(), *layer_axis, *tp_axis, prepend_axis_num=len(layer_axis)
    )


def sharded_tensors(full: dict[str, torch.Tensor], num_layers: int, tp: int, family: str = "llama") -> dict:
    """Every TP rank's slice of the full Megatron weights as the ShardedTensor Megatron-Core's GPTModel gives
    that rank (`sharded_state_dict()` with the engine's metadata): a layer's tensors share one key with a
    leading layer axis at the global layer index; a TP-split weight is `tp` chunks along its split dim; the
    fused fc1 is stored as [gate; up] whatever the TP size (rank r holds chunks r and tp+r of 2*tp); norms
    are stored once. PP stages only choose which layers a rank holds, which the global offsets already fix.
    """
    from llmtrain.models import get_family

    layout = get_family(family).megatron
    out = {}
    for name, whole in full.items():
        m = _LAYER_INDEX.match(name)
        key = f"decoder.layers.{m.group(2)}" if m else name
        layer_axis = [(0, int(m.group(1)), num_layers)] if m else []
        lead = len(layer_axis)
        slices = [layout.tp_shard(name, whole, tp, r) for r in range(tp)]
        if slices[0].shape == whole.shape:  # replicated over TP ranks, or tp=1
            shards = [_sharded(key, whole, layer_axis)]
        elif name.endswith(".mlp.linear_fc1.weight"):
            shards = [
                _sharded(key, half, layer_axis, (lead, r + i * tp, 2 * tp))
                for r, s in enumerate(slices)
                for i, half in enumerate(s.chunk(2, 0))
            ]
        else:
            dim = next(d for d, (a, b) in enumerate(zip(slices[0].shape, whole.shape)) if a != b)
            shards = [_sharded(key, s, layer_axis, (lead + dim, r, tp)) for r, s in enumerate(slices)]
        out |= {f"{name}#{i}": sh for i, sh in enumerate(shards)}
    return out


@contextlib.contextmanager
def _cpu_stand_ins(active: bool):
    """Megatron-Core's saver syncs CUDA after its (here CPU-to-CPU) copies and puts a one-element flag on
    the current CUDA device for an all-reduce. In a conversion's own gloo group, on any machine, both
    become CPU no-ops; inside someone else's (NCCL) job nothing is changed."""
    if not active:
        yield
        return
    with (
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
        mock.patch.object(torch.cuda, "current_device", lambda: "cpu"),
    ):
        yield


def _require_writer() -> None:
    if importlib.util.find_spec("megatron.core") is None:
        raise UserError("import --engine megatron needs megatron-core: pip install megatron-core")
    if importlib.util.find_spec("psutil") is None:  # its forked file writers die without it
        raise UserError(
            "import --engine megatron needs psutil (Megatron-Core's checkpoint writer uses it): pip install psutil"
        )


def save_dist_checkpoint(sharded: dict, directory: Path) -> None:
    """Megatron-Core torch_dist checkpoint of `sharded` in the empty `directory`, from one process."""
    from megatron.core import dist_checkpointing

    from llmtrain.engines.megatron_engine.checkpoint import keep_write_results_in_process
    from llmtrain.engines.megatron_engine.settings import CKPT_METADATA

    keep_write_results_in_process()  # as the engine saves: no Manager helper process to spawn or lose
    owns_group = _ensure_process_group()
    try:
        with _cpu_stand_ins(owns_group or not torch.cuda.is_available()):
            dist_checkpointing.save(sharded, str(directory), content_metadata=dict(CKPT_METADATA))
    finally:
        if owns_group:
            close_process_group()


def import_to_megatron(
    files, spec: ModelSpec, out: Path, *, config: dict, tp: int, pp: int, force: bool, extra
) -> Path:
    """HF weights -> a Megatron engine checkpoint dir (step 0, model only, FP32) for the layout tp x pp.

    `out/megatron/` is a Megatron-Core dist checkpoint (torch_dist) whose tensors are split into the TP
    shards the engine's ranks hold; `train.init_from=out` starts the engine from it in any layout.
    """
    check_layout(spec, tp, pp)
    _require_writer()
    state = {
        k: v.float()
        for k, v in hf.iter_hf_tensors(files)
        if not (spec.tie_embeddings and k == "lm_head.weight")
    }
    full = spec.model_family.megatron.to_megatron(state, spec)
    del state  # the un-fused q/k/v and gate/up copies
    config = config | {"engine": {"name": "megatron"}, "parallel": {"tp": tp, "pp": pp}}
    with fmt.atomic_output_dir(out, force) as tmp:
        (tmp / SUBDIR).mkdir()
        save_dist_checkpoint(sharded_tensors(full, spec.num_layers, tp, spec.family), tmp / SUBDIR)
        write_config_and_files(tmp, config, extra)
        fmt.write_manifest(tmp, 0, "megatron", extra={"layout": {"tp": tp, "pp": pp}})
    return out
