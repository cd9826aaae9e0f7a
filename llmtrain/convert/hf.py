"""Hugging Face model directories: reading and writing config.json, safetensors shards and tokenizers.

What a family's tensors and config are called in HF (names, shapes, config translation) is the family's
adapter (llmtrain/models/<family>/hf.py), found from config.json's `model_type` or the spec's
`family`; the functions below that take a spec are entry points to it. transformers is imported lazily
(it is the optional `hf` extra).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from llmtrain.convert.io import iter_safetensors, safetensors_names, save_model_file
from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.llama.hf import LlamaHF, hf_rope, transformers  # noqa: F401 (hf_rope: re-export)
from llmtrain.models.registry import FAMILIES, family_for_hf_model_type, get_family
from llmtrain.models.spec import ModelSpec

HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
BUILTIN_EOS = "<|endoftext|>"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPES |= {"float16": torch.float16, "fp16": torch.float16}


def _transformers():
    return transformers()


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"--dtype {name!r} is not supported (allowed: float32, bfloat16, float16)")
    return _DTYPES[name]


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '10KB' / 1234 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    exp = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**exp)


# ---------------------------------------------------------------------------------------------------------
# Names and shapes


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The state dict the family's model stores (llmtrain names), computed without allocating the model."""
    return spec.model_family.hf.expected_shapes(spec)


def check_shapes(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    """Strict comparison of tensor names and shapes -> one-line UserError naming the first problem."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{source}: shape mismatch for {k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
            f" ({len(wrong)} tensors differ); set the model config to the checkpoint's architecture"
        )
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]} ({len(missing)} missing); the checkpoint is incomplete"
            " or for a different architecture (num_layers / tie_embeddings)"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected); the checkpoint is"
            " for a different architecture (num_layers / tie_embeddings)"
        )


# Every family uses HF's names without the `model.` prefix.
hf_to_llmtrain_name = LlamaHF.to_llmtrain_name
llmtrain_to_hf_name = LlamaHF.to_hf_name


# ---------------------------------------------------------------------------------------------------------
# Config translation


def read_hf_config(hf_dir: str | Path):
    """config.json of an HF directory -> the transformers config of its family (found from `model_type`),
    rejecting what llmtrain cannot represent."""
    path = Path(hf_dir).expanduser() / HF_CONFIG
    if not path.is_file():
        raise UserError(
            f"{path} not found; pass a Hugging Face model directory (config.json + *.safetensors)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(raw).__name__}, not an object; use the model's config.json"
        )
    model_type = raw.get("model_type")
    family = family_for_hf_model_type(model_type)
    if family is None:
        known = ", ".join(repr(get_family(f).hf_model_type) for f in FAMILIES)
        raise UserError(
            f"{path}: model_type={model_type!r} is not supported; llmtrain converts model_type {known}"
        )
    return family.hf.parse_config(raw, path)


def model_config_from_hf(cfg, name: str | None = None) -> dict:
    """transformers config -> the `model:` section of an llmtrain config (ModelConfig fields)."""
    return family_for_hf_model_type(cfg.model_type).hf.model_config(cfg, name)


def hf_config_from_spec(
    spec: ModelSpec,
    dtype: torch.dtype = torch.float32,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
):
    """ModelSpec -> the transformers config of its family's *ForCausalLM."""
    return spec.model_family.hf.hf_config(spec, dtype, bos_token_id, eos_token_id, pad_token_id)


# ---------------------------------------------------------------------------------------------------------
# Reading HF weights


def hf_weight_files(hf_dir: str | Path) -> dict[str, Path]:
    """{HF tensor name: safetensors file} for a sharded (index json) or single-file directory."""
    d = Path(hf_dir).expanduser()
    index = d / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        files = {name: d / shard for name, shard in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(
                f"{d}: missing shard {missing[0]} ({len(missing)} of {len(set(files.values()))} shards missing)"
                " listed in model.safetensors.index.json; download the complete model"
            )
        return files
    single = d / HF_SINGLE
    if single.is_file():
        return {name: single for name in safetensors_names(single)}
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise UserError(
            f"{d} has only pickle weights (*.bin/*.pt); llmtrain reads safetensors only, re-save the model"
            " with save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(
        f"{d} has no model.safetensors or model.safetensors.index.json; download the weights"
    )


def hf_tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """{llmtrain name: shape} from the safetensors headers (no tensor data read)."""
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    shapes = {}
    for f, names in by_file.items():
        header = safetensors_names(f)
        for name in names:
            if name not in header:
                raise CheckpointError(
                    f"{f.name} does not contain {name} although the index says so; re-download it"
                )
            llm = hf_to_llmtrain_name(name)
            if llm is not None:
                shapes[llm] = header[name][0]
    return shapes


def iter_hf_tensors(files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (llmtrain name, tensor) shard by shard."""
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        for name, tensor in iter_safetensors(f, names):
            llm = hf_to_llmtrain_name(name)
            if llm is not None:
                yield llm, tensor


def checked_hf_shapes(files: dict[str, Path], spec: ModelSpec, source: str) -> dict[str, tuple[int, ...]]:
    """Shapes of an HF checkpoint checked against `spec`; a tied model may carry a redundant lm_head."""
    shapes = hf_tensor_shapes(files)
    if spec.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    check_shapes(shapes, expected_shapes(spec), source)
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Writing HF directories


def write_hf_weights(state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int) -> list[str]:
    """HF-named tensors -> model.safetensors, or model-0000k-of-0000n.safetensors + the standard index json,
    split as transformers' save_pretrained splits (huggingface_hub's state-dict sharding)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_model_file({name: state[name] for name in names}, out_dir / fname)
    if not split.is_sharded:
        return list(split.filename_to_tensors)
    index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (out_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*split.filename_to_tensors, HF_INDEX]


def tokenizer_source(spec: str | None) -> Path | None:
    """`data.tokenizer` ('builtin', a tokenizer.json or an HF tokenizer dir) -> a path, or None."""
    if not spec:
        return None
    if spec == "builtin":
        return Path(__file__).resolve().parents[1] / "corpus" / "tokenizer.json"
    p = Path(spec).expanduser()
    if not p.exists():
        raise UserError(
            f"the run's tokenizer {p} (data.tokenizer) is missing; pass --tokenizer PATH or --no-tokenizer"
        )
    return p


def write_tokenizer(src: Path, out_dir: Path, model_max_length: int, eos: str | None = None) -> dict:
    """Write HF tokenizer files for `src`; returns {'bos_token_id', 'eos_token_id', 'pad_token_id'}.

    An HF tokenizer directory (tokenizer_config.json) is re-saved as is; a bare tokenizer.json gets `eos`
    (the run's end-of-document token) as its EOS token."""
    tf = _transformers()
    if src.is_dir() and (src / "tokenizer_config.json").is_file():
        tok = tf.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    else:
        file = src / "tokenizer.json" if src.is_dir() else src
        if not file.is_file():
            raise UserError(f"{src} has no tokenizer.json; pass --tokenizer PATH or --no-tokenizer")
        tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(file))
        eos = eos or BUILTIN_EOS
        if tok.convert_tokens_to_ids(eos) not in (None, tok.unk_token_id):
            tok.eos_token = eos  # the data pipeline separates documents with it
    tok.model_max_length = model_max_length
    tok.save_pretrained(str(out_dir))
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
