#!/usr/bin/env python
"""Hugging Face <-> llmtrain conversion; same as `python -m llmtrain.convert`.

scripts/convert_hf.py import /path/to/Meta-Llama-3-8B ckpt/llama3_8b
scripts/convert_hf.py export runs/.../ out/hf_model [--dtype bfloat16]
"""

import sys

from llmtrain.convert.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
