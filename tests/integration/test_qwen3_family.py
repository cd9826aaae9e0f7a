"""The Qwen3 family end to end on the CPU: HF round trip against transformers' Qwen3ForCausalLM (random
weights saved locally, offline), and a few training steps through the CLI.

Tolerance: logits compared with atol=1e-5, rtol=0 (FP32, the same math; `pytest -s` prints the measured
difference), tensors after import -> export bit-exact.
"""

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmtrain import checkpoint_format as fmt  # noqa: E402
from llmtrain.convert import api, io  # noqa: E402
from llmtrain.errors import UserError  # noqa: E402
from llmtrain.models import ModelSpec  # noqa: E402
from llmtrain.models.qwen3.model import Qwen3Model  # noqa: E402
from tests.helpers import hf_logits, losses, run_cli_in_process, save_tiny_hf_model  # noqa: E402

ATOL = 1e-5
TOKENS = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))


def make_hf_qwen3(tmp_path, tied=True, name="hf"):
    """A tiny random Qwen3ForCausalLM, head_dim (24) != hidden/heads (16), saved sharded; q_norm/k_norm
    non-trivial like every norm."""
    return save_tiny_hf_model(tmp_path, transformers.Qwen3Config, transformers.Qwen3ForCausalLM, tied=tied,
                              name=name, head_dim=24, rope_theta=1000000.0)  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_import_logits_export_reload(tmp_path, tied):
    hf_model, hf_dir = make_hf_qwen3(tmp_path, tied=tied)
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1  # really sharded
    ref = hf_logits(hf_model, TOKENS)

    ckpt = api.import_hf(hf_dir, tmp_path / "ckpt")
    cfg = fmt.read_config(fmt.resolve_checkpoint(ckpt))
    assert cfg.model.family == "qwen3" and cfg.model.head_dim == 24 and cfg.model.rope_theta == 1e6
    spec = ModelSpec.from_config(cfg.model)
    ours = spec.model_family.build_model(spec).eval()
    assert isinstance(ours, Qwen3Model)
    api.init_weights_from(str(ckpt), ours)
    with torch.no_grad():
        diff = (ours(TOKENS) - ref).abs().max().item()
    print(f"tied={tied}: Qwen3Model vs transformers Qwen3ForCausalLM logits, max abs diff {diff:.3g}")
    assert diff <= ATOL, diff

    out = api.export_hf(ckpt, tmp_path / "export", max_shard_size="50KB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 24 and config["tie_word_embeddings"] is tied
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    orig = hf_model.state_dict()
    back = reloaded.state_dict()
    assert back.keys() == orig.keys()
    assert all(torch.equal(back[k], orig[k]) for k in orig)  # FP32 in, FP32 out: bit-exact
    diff2 = (hf_logits(reloaded, TOKENS) - ref).abs().max().item()
    print(f"tied={tied}: import -> export -> transformers vs original, max abs diff {diff2:.3g}")
    assert diff2 <= ATOL, diff2


def test_qwen3_without_qk_norm_is_not_the_hf_model(tmp_path):
    """The parity above depends on the QK-norm: the same weights in a Llama (no q/k norm) differ."""
    hf_model, hf_dir = make_hf_qwen3(tmp_path)
    spec = api.describe_source(hf_dir)[1]
    ours = spec.model_family.build_model(spec).eval()
    api.init_weights_from(str(hf_dir), ours)
    for layer in ours.layers:
        layer.self_attn.q_norm.weight.data.fill_(1.0)  # what a model without the norm's weight computes
    with torch.no_grad():
        assert (ours(TOKENS) - hf_logits(hf_model, TOKENS)).abs().max().item() > 1e-3


def test_qwen3_sliding_window_rejected(tmp_path):
    _, hf_dir = make_hf_qwen3(tmp_path)
    raw = json.loads((hf_dir / "config.json").read_text()) | {
        "use_sliding_window": True,
        "sliding_window": 16,
    }
    (hf_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"unsupported Qwen3 variant: sliding-window attention"):
        api.import_hf(hf_dir, tmp_path / "ckpt")


def test_qwen3_checkpoint_into_llama_refused(tmp_path):
    _, hf_dir = make_hf_qwen3(tmp_path)
    llama = ModelSpec(**{**api.describe_source(hf_dir)[1].__dict__, "family": "llama"})
    with pytest.raises(
        UserError, match=r"model.family=llama but the checkpoint has qwen3; set model.family=qwen3"
    ):
        api.init_weights_from(str(hf_dir), llama.model_family.build_model(llama))


def test_qwen3_tiny_recipe_trains_on_cpu(tmp_path):
    """`python -m llmtrain recipe=qwen3_tiny` on the CPU: a few steps, a checkpoint, a finite falling loss."""
    run = tmp_path / "run"
    proc = run_cli_in_process(
        "recipe=qwen3_tiny",
        "train.steps=6",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_interval=0",
        "train.checkpoint_interval=0",
        "optim.warmup_steps=2",
        "logging.wandb.mode=disabled",
        "logging.console=plain",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = losses(run)
    assert len(loss) == 6 and all(math.isfinite(x) for x in loss)
    # Untrained: the loss starts near ln(vocab); 6 steps at lr 3e-3 must bring it down.
    assert abs(loss[0] - math.log(4096)) < 0.5 and loss[-1] < loss[0]
    step_dir = fmt.resolve_checkpoint(run)
    state = io.load_model_state(step_dir)
    assert "layers.1.self_attn.q_norm.weight" in state and "lm_head.weight" not in state  # tied
    assert fmt.read_config(step_dir).model.family == "qwen3"
