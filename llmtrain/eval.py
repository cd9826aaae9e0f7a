"""Evaluate a checkpoint: perplexity on the held-out split, optionally lm-eval harness tasks.

    python -m llmtrain.eval CHECKPOINT [--steps 10] [--micro-batch-size 8] [--seq-length 256]
    python -m llmtrain.eval CHECKPOINT --lm-eval hellaswag,arc_easy [--limit 100]   # needs lm-eval[hf]

CHECKPOINT: an llmtrain run dir / checkpoints/ dir / step dir, or a Hugging Face directory of a registered
model family (llmtrain.models.registry). Prints one JSON line: {"checkpoint", "step", "valid_loss", "perplexity", "tokens", ...}. Errors: one line, exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from llmtrain.errors import UserError
from llmtrain.fsio import check_writable_dir, write_text_atomic


def eval_config(source: str | Path, overrides: dict | None = None):
    """The config the data layer needs: the checkpoint's stored config over the schema defaults."""
    from omegaconf import OmegaConf

    from llmtrain.config.schema import Config
    from llmtrain.convert import api

    kind, spec, info = api.describe_source(source)
    base = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(Config)))
    if kind == "llmtrain":
        cfg = OmegaConf.merge(base, info["config"])
    else:
        tok = info["dir"] / "tokenizer.json"
        cfg = OmegaConf.merge(base, {"data": {"tokenizer": str(info["dir"]) if tok.is_file() else "builtin"}})
    cfg.model = OmegaConf.merge(cfg.model, {k: getattr(spec, k) for k in spec.__dataclass_fields__})
    for key, value in (overrides or {}).items():
        if value is not None:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg, spec, kind, info


def load_model(
    source: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True
):
    from llmtrain.convert import init_weights_from
    from llmtrain.convert.api import describe_source

    kind, spec, info = describe_source(source, verify)
    if kind == "llmtrain":
        source = info["step_dir"]  # the checkpoint found (and verified) just now, read below unchecked
    with torch.device("meta"):
        model = spec.model_family.build_model(spec)
    model = model.to_empty(device=device)  # no random init of weights that are overwritten next
    if spec.tie_embeddings:  # to_empty gives the tied output head its own storage: tie it again
        model.lm_head.weight = model.embed_tokens.weight
    init_weights_from(str(source), model, verify=False)
    model = model.to(dtype)
    model.rope_cos, model.rope_sin = (t.to(device) for t in _rope(spec))  # FP32 tables whatever the dtype
    return model.eval()


def _rope(spec):
    from llmtrain.models.layers import rope_tables

    return rope_tables(spec.seq_length, spec.head_dim, spec.rope_theta)


@torch.no_grad()
def perplexity(model, micro_batches, device: str = "cpu") -> dict:
    """Token-weighted mean cross-entropy over the micro-batches and its exponential."""
    from llmtrain.models.layers import causal_lm_loss

    total, tokens = 0.0, 0.0
    for mb in micro_batches:
        logits = model(mb["tokens"].to(device))
        mask = mb["loss_mask"].to(device)
        n = float(mask.sum())
        total += float(causal_lm_loss(logits, mb["labels"].to(device), mask)) * n
        tokens += n
    if tokens == 0:
        raise UserError("the held-out split gave no tokens to evaluate; raise --steps or check data.split")
    loss = total / tokens
    return {"valid_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def evaluate(
    source: str | Path,
    *,
    steps: int = 10,
    micro_batch_size: int | None = None,
    seq_length: int | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> dict:
    from llmtrain.convert.hf import parse_dtype
    from llmtrain.data import build_data

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, spec, kind, info = eval_config(  # an llmtrain checkpoint is found and verified once, here
        source, {"data.tokenizer": tokenizer, "train.micro_batch_size": micro_batch_size}
    )
    weights = info["step_dir"] if kind == "llmtrain" else source
    if seq_length is not None:
        if seq_length > spec.seq_length:
            raise UserError(f"--seq-length {seq_length} exceeds the model's seq_length {spec.seq_length}")
        cfg.model.seq_length = seq_length
    # One micro-batch per eval step on one process (dp_size=1); the valid dataset is sized from eval_steps,
    # and the train dataset (built alongside, unused) is kept minimal.
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    cfg.train.eval_steps = steps
    cfg.train.steps = 1
    data = build_data(cfg, dp_rank=0, dp_size=1, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    model = load_model(weights, device, parse_dtype(dtype), verify=False)
    result = perplexity(model, data.valid_batches(steps), device)
    step = None
    if kind == "llmtrain":
        from llmtrain.checkpoint_format import read_manifest

        step = read_manifest(weights).get("step")
    return {"checkpoint": str(source), "step": step, **result, "seq_length": int(cfg.model.seq_length)}


def lm_eval_task_manager(tasks: list[str | dict]):
    """lm-eval's TaskManager once lm-eval (with its hf extra) imports and knows every named task."""
    try:
        import lm_eval.models.huggingface  # noqa: F401 (the `hf` model; it needs lm-eval's hf extra)
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"--lm-eval needs lm-eval with its hf extra ({e}): pip install 'lm-eval[hf]'") from e
    task_manager = TaskManager()
    known = set(task_manager.all_tasks)
    if unknown := [t for t in tasks if isinstance(t, str) and t not in known]:
        raise UserError(
            f"--lm-eval {unknown[0]}: not an lm-eval task, group or tag ({len(known)} known);"
            " list them with `lm-eval ls tasks`"
        )
    return task_manager


def lm_eval_tasks(
    source: str | Path, tasks: list[str | dict], limit: int | None, device: str, dtype: str, task_manager=None
) -> dict:
    """lm-eval harness tasks through its `hf` model; an llmtrain checkpoint is exported to a temp dir first.

    tasks: registered task/group names, or task config dicts (lm-eval's YAML keys) for local tasks.
    """
    task_manager = task_manager or lm_eval_task_manager(tasks)
    import lm_eval

    from llmtrain.convert import api

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="llmtrain-eval-") as tmp:
        hf_dir = Path(source)
        if not api.is_hf_dir(source):
            hf_dir = api.export_hf(source, Path(tmp) / "hf", dtype=dtype)
        if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").is_file():
            raise UserError(f"{source} has no tokenizer, which lm-eval needs; export with --tokenizer PATH")
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={hf_dir},dtype={dtype},device={device}",
            tasks=tasks,
            limit=limit,
            task_manager=task_manager,
        )
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        for task, metrics in out["results"].items()
    }


def main(argv: list[str] | None = None) -> int:
    # No HF_HUB_OFFLINE here: perplexity reads only local files, and lm-eval tasks may need to download
    # their datasets (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 make them use the cache only).
    from llmtrain.argcheck import OneLineParser, int_at_least

    p = OneLineParser(prog="python -m llmtrain.eval", description=__doc__.split("\n")[0])
    p.add_argument(
        "checkpoint", help="llmtrain run dir / checkpoints/ / step dir, or a Hugging Face Llama/Qwen3 dir"
    )
    p.add_argument(
        "--steps", type=int_at_least(1), default=10, help="held-out micro-batches to evaluate (default 10)"
    )
    p.add_argument(
        "--micro-batch-size",
        type=int_at_least(1),
        default=None,
        help="default: the run's train.micro_batch_size",
    )
    p.add_argument("--seq-length", type=int_at_least(2), default=None, help="default: the model's seq_length")
    p.add_argument(
        "--tokenizer", default=None, help="default: the run's data.tokenizer / the HF dir's tokenizer"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="float32 | bfloat16")
    p.add_argument(
        "--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-eval tasks (optional)"
    )
    p.add_argument("--limit", type=int_at_least(1), default=None, help="lm-eval: examples per task")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    output_fix = "pass --output a file in a writable directory with room"
    try:
        if args.output:  # before the evaluation, not after it
            check_writable_dir(args.output, output_fix)
        tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
        task_manager = lm_eval_task_manager(tasks) if tasks else None  # fail before the perplexity run
        result = evaluate(
            args.checkpoint,
            steps=args.steps,
            micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
        )
        if tasks:
            result["lm_eval"] = lm_eval_tasks(
                args.checkpoint, tasks, args.limit, args.device, args.dtype, task_manager
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    line = json.dumps(result)
    print(line)
    if args.output:
        try:
            write_text_atomic(args.output, line + "\n", output_fix + " (the result is printed above)")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return UserError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
