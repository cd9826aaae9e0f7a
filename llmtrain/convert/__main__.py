"""`python -m llmtrain.convert import|export ...` (also scripts/convert_hf.py). Errors: one line, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmtrain.argcheck import OneLineParser, int_at_least
from llmtrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m llmtrain.convert",
        description="Convert between Hugging Face (Llama, Qwen3) and llmtrain checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser(
        "import",
        help="HF Llama/Qwen3 directory -> llmtrain checkpoint (step 0, model weights only; torch: safetensors,"
        " megatron: Megatron-Core dist checkpoint)",
    )
    imp.add_argument("hf_dir", help="directory with config.json and model*.safetensors (sharded or not)")
    imp.add_argument("out", help="checkpoint directory to create (use it as train.init_from=OUT)")
    imp.add_argument(
        "--engine", default="torch", choices=["torch", "megatron"], help="engine layout (default torch)"
    )
    imp.add_argument(
        "--tp",
        type=int_at_least(1),
        default=1,
        help="megatron engine: tensor-parallel size the weights are sharded for",
    )
    imp.add_argument(
        "--pp",
        type=int_at_least(1),
        default=1,
        help="megatron engine: pipeline-parallel size (checked, recorded)",
    )
    imp.add_argument("--name", default=None, help="model.name to record (default: the HF directory name)")
    imp.add_argument("--force", action="store_true", help="replace OUT if it exists")

    exp = sub.add_parser(
        "export", help="llmtrain checkpoint -> HF directory of its family (transformers-loadable)"
    )
    exp.add_argument("checkpoint", help="run dir, its checkpoints/ dir (follows `latest`) or a step_* dir")
    exp.add_argument("out", help="HF directory to create")
    exp.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype: float32 (default), bfloat16, float16",
    )
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    exp.add_argument(
        "--tokenizer", default=None, help="tokenizer to ship (default: the run's data.tokenizer)"
    )
    exp.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    exp.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the checkpoint files")
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversions are local; never reach for the Hub
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llmtrain.convert import api

    try:
        if args.command == "import":
            out = api.import_hf(
                args.hf_dir,
                args.out,
                engine=args.engine,
                tp=args.tp,
                pp=args.pp,
                force=args.force,
                name=args.name,
            )
        else:
            from llmtrain.convert.hf import parse_size

            if parse_size(args.max_shard_size) <= 0:
                raise UserError(
                    f"--max-shard-size {args.max_shard_size!r} must be > 0; use e.g. 5GB or 500MB"
                )
            out = api.export_hf(
                args.checkpoint,
                args.out,
                force=args.force,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
                with_tokenizer=not args.no_tokenizer,
                verify=not args.no_verify,
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    from llmtrain.process_exit import run_and_exit

    run_and_exit(main)
