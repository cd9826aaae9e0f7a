"""Parity of the Qwen3 family: the torch reference Qwen3Model and the Megatron engine (TE layer spec with
qk_layernorm, kv_channels = head_dim) from the same weights on the same batches, with the checks and bounds
of tests/gpu/test_megatron_parity.py (exact mapping round trip; init loss, first-step gradients and the
50-step curve within a margin of torch's own measured BF16 noise; the model learns).

Model: Qwen3-0.6B shapes (configs/model/qwen3_0_6b.yaml: hidden 1024, 16 heads of head_dim 128 != 64,
8 KV heads, tied 151936-token embedding, RoPE base 1e6, RMSNorm eps 1e-6) cut to 4 layers, seq 1024:
the widths and vocabulary of the real model at the cost of a small one.
"""

import pytest
import torch

from tests.gpu.test_megatron_parity import SEQ, run_parity
from tests.megatron_helpers import make_config

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    pytest.importorskip("transformer_engine.pytorch")  # before torch's kernels load their own cuDNN


def test_qwen3_torch_vs_megatron_same_weights():
    cfg = make_config("qwen3_0_6b", "bf16", "single", {"model": {"seq_length": SEQ, "num_layers": 4}})
    assert cfg.model.family == "qwen3" and cfg.model.head_dim == 128 and cfg.model.tie_embeddings
    run_parity(cfg, "parity_qwen3_0_6b_4_layers")
