"""Import / export / init-from: the operations behind `python -m llmtrain.convert` and `train.init_from`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmtrain import checkpoint_format as fmt
from llmtrain.convert import hf, io
from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.spec import STRUCTURAL, ModelSpec

log = logging.getLogger(__name__)

# Fields outside models.spec.STRUCTURAL (a mismatch is an error) that may legitimately change when
# continuing from a checkpoint (as seq_length): they only warn.
SOFT = ("rope_theta", "norm_eps")


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / hf.HF_CONFIG).is_file() and not fmt.is_step_dir(p)


def load_model_state(step_dir: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full model state dict (llmtrain names) of a torch or Megatron engine step dir; verify=False
    where the caller verified it already (checkpoint_format.resolve_checkpoint)."""
    manifest = fmt.verify(Path(step_dir)) if verify else fmt.read_manifest(Path(step_dir))
    if manifest.get("engine", "torch") == "torch":
        return io.load_model_state(step_dir, verify=False)
    from llmtrain.convert import megatron

    return megatron.load_model_state(Path(step_dir), manifest)


def _spec_from_model_cfg(model_cfg, source: str) -> ModelSpec:
    try:
        return ModelSpec.from_config(model_cfg)
    except TypeError as e:
        raise CheckpointError(f"{source}: the model: section of config.yaml is incomplete ({e})") from e


def describe_source(path: str | Path, verify: bool = True) -> tuple[str, ModelSpec, dict]:
    """('hf' | 'llmtrain', spec, info) for an HF directory or an llmtrain checkpoint, reading no tensors.

    info: for 'hf' {'dir', 'files', 'hf_config'}; for 'llmtrain' {'step_dir', 'config'}: the step dir
    checkpoint_format.resolve_checkpoint found (verified unless verify=False; a run dir falls back past a
    corrupt `latest` as resume does).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"{p} does not exist; pass a Hugging Face Llama directory or an llmtrain run dir / checkpoints/ /"
            " step dir"
        )
    if is_hf_dir(p):
        hf_cfg = hf.read_hf_config(p)
        spec = ModelSpec(**hf.model_config_from_hf(hf_cfg, name=p.name))
        return "hf", spec, {"dir": p, "files": hf.hf_weight_files(p), "hf_config": hf_cfg}
    step = fmt.resolve_checkpoint(p, check=verify)
    cfg = fmt.read_config(step)
    return "llmtrain", _spec_from_model_cfg(cfg.model, str(step)), {"step_dir": step, "config": cfg}


def load_state(path: str | Path, verify: bool = True) -> tuple[ModelSpec, dict[str, torch.Tensor], dict]:
    """Full llmtrain-named state dict (tied lm_head dropped) of an HF dir or llmtrain checkpoint, shape-checked."""
    kind, spec, info = describe_source(path, verify)
    if kind == "hf":
        hf.checked_hf_shapes(info["files"], spec, str(info["dir"]))
        state = {
            k: v
            for k, v in hf.iter_hf_tensors(info["files"])
            if not (spec.tie_embeddings and k == "lm_head.weight")
        }
    else:
        state = load_model_state(info["step_dir"], verify=False)  # describe_source verified it
        if spec.tie_embeddings:
            state.pop("lm_head.weight", None)
        hf.check_shapes(
            {k: tuple(v.shape) for k, v in state.items()}, hf.expected_shapes(spec), str(info["step_dir"])
        )
    return spec, state, info | {"kind": kind}


# ---------------------------------------------------------------------------------------------------------
# init_from


def check_architecture(model_spec: ModelSpec, ckpt_spec: ModelSpec, source: str) -> None:
    """Structural fields must match (one-line UserError naming the key to set); rope_theta/norm_eps warn."""
    for key in STRUCTURAL:
        mine, theirs = getattr(model_spec, key), getattr(ckpt_spec, key)
        if mine != theirs:
            raise UserError(
                f"train.init_from={source}: model.{key}={mine} but the checkpoint has {theirs};"
                f" set model.{key}={theirs} (or pick a matching recipe)"
            )
    for key in SOFT:
        mine, theirs = getattr(model_spec, key), getattr(ckpt_spec, key)
        if mine != theirs:
            log.warning(
                "init_from %s: model.%s=%s differs from the checkpoint's %s", source, key, mine, theirs
            )


@torch.no_grad()
def init_weights_from(path: str, model, verify: bool = True) -> None:
    """Load an HF directory (a registered family) or an llmtrain checkpoint (run dir / checkpoints/ / step dir) into `model`.

    Strict: the architecture, every tensor name and shape must match, else a one-line UserError. Weights
    are copied tensor by tensor (cast to the model's dtype/device), so the source never sits in memory whole.
    An llmtrain checkpoint is verified first (verify=False: the caller did), as resume verifies it.
    """
    kind, spec, info = describe_source(path, verify)
    check_architecture(model.spec, spec, str(path))
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as embed_tokens.weight
    if kind == "hf":
        hf.checked_hf_shapes(info["files"], model.spec, str(path))
        tensors = hf.iter_hf_tensors(info["files"])
    else:
        state = load_model_state(info["step_dir"], verify=False)  # describe_source verified it
        hf.check_shapes(
            {
                k: tuple(v.shape)
                for k, v in state.items()
                if not (spec.tie_embeddings and k == "lm_head.weight")
            },
            hf.expected_shapes(model.spec),
            str(info["step_dir"]),
        )
        tensors = iter(state.items())
    loaded = set()
    for name, tensor in tensors:
        if name not in params:  # the redundant lm_head of a tied model
            continue
        params[name].copy_(tensor)
        loaded.add(name)
    if missing := [n for n in params if n not in loaded]:  # pragma: no cover - check_shapes guarantees this
        raise CheckpointError(f"train.init_from={path}: no weights for {missing[0]} ({len(missing)} missing)")
    log.info("initialized %d tensors from %s (%s)", len(loaded), path, kind)


# ---------------------------------------------------------------------------------------------------------
# import


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    engine: str = "torch",
    tp: int = 1,
    pp: int = 1,
    force: bool = False,
    name: str | None = None,
) -> Path:
    """HF directory (Llama, Qwen3: its model_type picks the family) -> llmtrain checkpoint dir (step 0, model only, FP32) for `engine`."""
    hf_dir = Path(hf_dir).expanduser().resolve()
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory; pass a Hugging Face model directory")
    hf_cfg = hf.read_hf_config(hf_dir)
    model_cfg = hf.model_config_from_hf(hf_cfg, name=name or hf_dir.name)
    spec = ModelSpec(**model_cfg)
    files = hf.hf_weight_files(hf_dir)
    hf.checked_hf_shapes(files, spec, str(hf_dir))  # before reading any data or creating `out`
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; choose another path or pass --force to replace it")

    config: dict = {"model": model_cfg}
    extra: dict[str, Path] = {}
    tok_files = [hf_dir / n for n in hf.TOKENIZER_FILES if (hf_dir / n).is_file()]
    if any(p.name == "tokenizer.json" for p in tok_files):
        extra = {f"tokenizer/{p.name}": p for p in tok_files}
        config["data"] = {"tokenizer": str(out / "tokenizer")}
    config["source"] = {"hf_dir": str(hf_dir), "format": "huggingface"}

    if engine == "megatron":
        from llmtrain.convert import megatron

        return megatron.import_to_megatron(
            files, spec, out, config=config, tp=tp, pp=pp, force=force, extra=extra
        )
    if engine != "torch":
        raise UserError(f"--engine {engine!r} is not supported (allowed: torch, megatron)")
    if tp != 1 or pp != 1:
        raise UserError("--tp/--pp apply to --engine megatron only; the torch engine checkpoint is unsharded")
    state = {
        k: v.float()
        for k, v in hf.iter_hf_tensors(files)
        if not (spec.tie_embeddings and k == "lm_head.weight")
    }
    return io.write_checkpoint(out, state, config, step=0, engine="torch", force=force, extra_files=extra)


# ---------------------------------------------------------------------------------------------------------
# export


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    dtype: str = "float32",
    tokenizer: str | None = None,
    with_tokenizer: bool = True,
    verify: bool = True,
) -> Path:
    """llmtrain checkpoint (run dir / checkpoints/ / step dir) -> HF dir of its family loadable by transformers offline.

    Writes config.json, generation_config.json, model(-0000k-of-0000n).safetensors (+ index) and, when the run
    had a tokenizer (data.tokenizer, or `tokenizer`), the tokenizer files; all in a temp dir renamed at the end.
    """
    torch_dtype = hf.parse_dtype(dtype)
    shard_bytes = hf.parse_size(max_shard_size)
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; choose another path or pass --force to replace it")
    step = fmt.resolve_checkpoint(checkpoint, check=verify)
    cfg = fmt.read_config(step)
    spec = _spec_from_model_cfg(cfg.model, str(step))
    tok_src, eos = None, None
    if with_tokenizer:
        from omegaconf import OmegaConf

        tok_spec = tokenizer or OmegaConf.select(cfg, "data.tokenizer", default=None)
        tok_src = hf.tokenizer_source(tok_spec)
        if tok_src is not None:
            eos = _eos_name(str(tok_src), OmegaConf.select(cfg, "data.eos", default=None))
    state = load_model_state(step, verify=False)  # resolve_checkpoint verified it
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    hf.check_shapes({k: tuple(v.shape) for k, v in state.items()}, hf.expected_shapes(spec), str(step))

    with fmt.atomic_output_dir(out, force) as tmp:
        special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if tok_src is not None:
            special = hf.write_tokenizer(tok_src, tmp, model_max_length=spec.seq_length, eos=eos)
        hf_cfg = hf.hf_config_from_spec(spec, dtype=torch_dtype, **special)
        hf_cfg.save_pretrained(str(tmp))
        _add_legacy_rope_theta(tmp / hf.HF_CONFIG, spec.rope_theta)
        gen = hf._transformers().GenerationConfig(
            bos_token_id=special["bos_token_id"],
            eos_token_id=special["eos_token_id"],
            pad_token_id=special["pad_token_id"],
        )
        gen.save_pretrained(str(tmp))
        hf_state = {hf.llmtrain_to_hf_name(k): v.to(torch_dtype) for k, v in state.items()}
        del state
        hf.write_hf_weights(hf_state, tmp, shard_bytes)
    log.info("exported %s -> %s", step, out)
    return out


def _eos_name(tokenizer: str, override: str | None) -> str | None:
    """The run's end-of-document token (data.eos, else the data layer's rule), None if it has none."""
    try:
        from llmtrain.data.tokenizer import eos_token

        return eos_token(tokenizer, override)[0]
    except (ImportError, UserError):
        return None


def _add_legacy_rope_theta(path: Path, theta: float) -> None:
    """transformers 5 writes rope_theta inside rope_parameters; tools on transformers 4 read the top-level key."""
    cfg = json.loads(path.read_text())
    cfg.setdefault("rope_theta", theta)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
