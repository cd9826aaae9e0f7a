"""HF export sharding: the same files and index as huggingface_hub's save_torch_state_dict (what
transformers' save_pretrained writes), also where one tensor is larger than the shard limit."""

import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from llmtrain.convert import hf


def _state():
    g = torch.Generator().manual_seed(0)
    sizes = {"a.weight": 300, "big.weight": 5000, "b.weight": 200, "c.weight": 400, "d.weight": 100}
    return {name: torch.randn(n, generator=g) for name, n in sizes.items()}  # fp32: 4 B per element


@pytest.mark.parametrize("max_shard_size", [4000, 10**9])
def test_shards_and_index_are_huggingface_hubs(tmp_path, max_shard_size):
    state = _state()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    written = hf.write_hf_weights(state, ours, max_shard_size)
    save_torch_state_dict(state, theirs, max_shard_size=max_shard_size, safe_serialization=True)
    assert sorted(written) == sorted(p.name for p in theirs.iterdir())
    for name in written:
        if name.endswith(".json"):
            assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text())
        else:
            mine, ref = load_file(ours / name), load_file(theirs / name)
            assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)
    if max_shard_size == 4000:  # the 20 kB tensor alone in a shard, the rest packed behind it
        index = json.loads((ours / hf.HF_INDEX).read_text())
        assert index["weight_map"]["big.weight"] != index["weight_map"]["a.weight"]
        assert index["metadata"]["total_size"] == 4 * 6000
