"""TE 2.20's NVFP4 options through the CLI (torch engine): a tiny run with each trains, and its losses
differ from plain NVFP4's on the same data and seed, so the key reaches the GEMMs."""

import math

import pytest

from tests.helpers import FAST, losses, run_cli_in_process

# No RHT: TE refuses 4over6 on an RHT-transformed operand (the activations' wgrad x^T).
NVFP4 = [*FAST, "precision=nvfp4", "precision.rht=false", "precision.bf16_layers.last=0", "train.steps=3"]
OPTIONS = {
    "4over6_weights": ["precision.nvfp4_4over6=weights"],
    "4over6_activations_mse": ["precision.nvfp4_4over6=activations", "precision.nvfp4_4over6_err_mode=MSE"],
    "4over6_all_448": ["precision.nvfp4_4over6=all", "precision.nvfp4_4over6_e4m3_use_256=none"],
    "row_scaled": ["precision.row_scaled_activation=true"],
}


@pytest.mark.slow
def test_each_option_trains_and_changes_the_losses(tmp_path):
    run_cli_in_process(*NVFP4, f"hydra.run.dir={tmp_path / 'plain'}", check=True)
    plain = losses(tmp_path / "plain")
    assert len(plain) == 3 and all(math.isfinite(v) for v in plain)
    for name, keys in OPTIONS.items():
        run_cli_in_process(*NVFP4, *keys, f"hydra.run.dir={tmp_path / name}", check=True)
        got = losses(tmp_path / name)
        assert len(got) == 3 and all(math.isfinite(v) for v in got), name
        assert got != plain, name


def test_megatron_emulated_path_refuses_them_in_one_line():
    proc = run_cli_in_process("engine=megatron", "precision=nvfp4", "precision.backend=custom",
                   "precision.row_scaled_activation=true", "precision.bf16_layers.last=1", "dry_run=true")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: precision.backend='custom': precision.row_scaled_activation=true is emulated only on "
        "engine=torch; on the Megatron engine it needs a Blackwell GPU (native TE)"
    )
