import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel tests run in Triton's interpreter on the CPU. Triton reads this once, so it must be
    # set before anything (a test module, transformers, torch._dynamo) first imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
