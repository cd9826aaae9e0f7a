"""HF Llama -> Megatron engine with TP=2 (train.init_from) -> its dist checkpoint -> HF export, on 2 GPUs.

The engine starts from a tiny random transformers model (the `tiny` model shapes) with TP=2; its loss on mock
batches must match transformers' FP32 loss within BF16 tolerance. It then saves a checkpoint (Megatron-Core
dist_checkpointing, TP=2 shards); `llmtrain.convert.export_hf` reads it back on one process and the exported
directory must hold exactly the BF16-rounded original weights and give transformers' loss again.
The same HF directory imported with `python -m llmtrain.convert import --engine megatron --tp 2` must start
the TP=2 engine with exactly the same loss as the HF directory itself.
This file is also the torchrun worker. Skipped with fewer than 2 GPUs.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (the 2-GPU host)"),
]

ROOT = Path(__file__).resolve().parents[2]
N_MB, SEQ = 4, 256
TOL = 2e-2  # BF16 weights and TE kernels vs FP32 eager transformers, on a ~8.3 nat loss


def worker(args) -> None:
    from omegaconf import OmegaConf

    from llmtrain import checkpoint_format as fmt
    from llmtrain.dist import DistInfo
    from llmtrain.engines.megatron_engine import MegatronEngine
    from llmtrain.engines.megatron_engine.batches import mock_batches
    from tests.megatron_helpers import make_config

    dist = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    cfg = make_config(
        "tiny", "bf16", "single", {"parallel": {"tp": args.tp}, "train": {"init_from": args.init}}
    )
    engine = MegatronEngine(cfg, dist)  # loads the weights, each TP rank its shard
    loss = engine.eval_loss(mock_batches(N_MB, 1, SEQ, cfg.model.vocab_size))
    if args.save:
        step_dir = Path(args.save)
        if dist.is_main:
            step_dir.mkdir(parents=True)
        engine.barrier()
        engine.save(step_dir)
        engine.barrier()
        if dist.is_main:
            (step_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            fmt.write_manifest(step_dir, step=0, engine="megatron")
    if dist.is_main:
        Path(args.out).write_text(json.dumps({"loss": loss, "backend": engine.backend_description}))
    engine.close()


def hf_loss(model, vocab: int) -> float:
    from llmtrain.engines.megatron_engine.batches import mock_batches
    from llmtrain.models.llama import causal_lm_loss

    losses = []
    with torch.no_grad():
        for b in mock_batches(N_MB, 1, SEQ, vocab):
            logits = model(b["tokens"].cuda()).logits.float()
            losses.append(float(causal_lm_loss(logits, b["labels"].cuda(), b["loss_mask"].cuda())))
    return sum(losses) / len(losses)


def test_hf_import_tp2_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformer_engine.pytorch")
    from llmtrain.convert import export_hf
    from tests.megatron_helpers import make_config, record

    spec = make_config("tiny").model
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        max_position_embeddings=spec.seq_length,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
    )
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    ref_loss = hf_loss(hf_model.cuda(), spec.vocab_size)

    out, step_dir = tmp_path / "megatron.json", tmp_path / "ckpt" / "step_00000000"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    subprocess.run(
        [*cmd, "--init", str(tmp_path / "hf"), "--save", str(step_dir), "--out", str(out), "--tp", "2"],
        check=True,
        env=env,
        cwd=ROOT,
    )
    mg_loss = json.loads(out.read_text())["loss"]

    # The offline import into the engine's own format (TP=2 shards) starts the engine identically.
    imported, out2 = tmp_path / "imported", tmp_path / "imported.json"
    convert = [sys.executable, "-m", "llmtrain.convert", "import", str(tmp_path / "hf"), str(imported)]
    subprocess.run([*convert, "--engine", "megatron", "--tp", "2"], check=True, env=env, cwd=ROOT)
    subprocess.run(
        [*cmd, "--init", str(imported), "--out", str(out2), "--tp", "2"], check=True, env=env, cwd=ROOT
    )
    imported_loss = json.loads(out2.read_text())["loss"]

    exported = export_hf(step_dir, tmp_path / "hf_out", with_tokenizer=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    orig, new = hf_model.state_dict(), back.state_dict()
    exact = all(torch.equal(new[k].cpu(), orig[k].cpu().bfloat16().float()) for k in orig)
    back_loss = hf_loss(back.cuda(), spec.vocab_size)
    record(
        "convert_megatron_tp2",
        {
            "hf_fp32_loss": ref_loss,
            "megatron_tp2_bf16_loss": mg_loss,
            "megatron_tp2_from_import_loss": imported_loss,
            "exported_loss": back_loss,
            "exact": exact,
        },
    )
    assert abs(mg_loss - ref_loss) < TOL
    assert imported_loss == mg_loss  # same FP32 weights, same BF16 rounding, same TP=2 shards
    assert exact  # the export holds the engine's BF16 weights, i.e. the HF weights rounded to BF16
    assert abs(back_loss - ref_loss) < TOL


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True, help="train.init_from: HF dir or llmtrain checkpoint")
    p.add_argument("--save", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=2)
    worker(p.parse_args())
