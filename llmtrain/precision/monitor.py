"""The sqrt(3) monitor: gradient norm vs quantization noise, measured as the optimizer sees the gradient
(its bookkeeping and the phase switch it triggers: controller.py).

"FP4 All the Way" (Chmiel et al., 2025) finds that quantized training stops helping once the gradient norm
falls below about sqrt(3) times the quantization noise. The probe measures that on the current weights,
on the batch of the *next* step (not yet trained on), over the whole global batch: every micro-batch,
averaged over data- and context-parallel ranks before any norm is taken, in the training's autocast. Four
gradient passes over that batch, each like a training step's forward/backward:

    G_fp   unquantized forward and backward (what a bf16 run computes on these weights)
    G_q    quantized forward and backward, stochastic rounding from probe stream A (what training computes)
    G_q'   the same with stream B (a second, independent SR draw)
    G_hp   quantized forward, high-precision backward (what QAF computes)

and three noise definitions, each logged over all quantized weights together:

    sqrt3/all       ||G_fp|| / ||G_q - G_fp||              total noise vs full precision (the paper's);
                                                           also per layer (sqrt3/<layer>); the trigger's
    sqrt3/backward  ||G_hp|| / ||G_q - G_hp||              noise the quantized backward adds (what QAF removes)
    sqrt3/sr        ||G_fp|| / (||G_q - G_q'|| / sqrt(2))  SR noise alone (std of one draw around its mean)

Engines fill a per-layer table of squared norms (`noise_table`), sum it over tensor-parallel shards and
gather pipeline stages, and `noise_probe` turns it into a NoiseProbe for the controller. The probe leaves
weights, .grad, optimizer state, RNG states, SR streams and the QAF mode as it found them.
"""

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from llmtrain.precision.convert import quantized_layers
from llmtrain.precision.modes import backward_mode, sr_stream, unquantized

# Columns of the per-layer table of squared norms, all over the global batch.
COLUMNS = ("grad", "total", "sr_pair", "grad_qaf", "backward")
# grad = ||G_fp||^2, total = ||G_q - G_fp||^2, sr_pair = ||G_q - G_q'||^2, grad_qaf = ||G_hp||^2,
# backward = ||G_q - G_hp||^2.
PASSES = ("full", "quantized", "redraw", "qaf")


def probe_keys(step: int) -> tuple[int, int]:
    """SR stream keys of the probe after optimizer step `step`: negative, so no training step uses them."""
    return -(2 * step + 1), -(2 * step + 2)


@dataclass
class NoiseProbe:
    ratios: dict[str, float]  # the trigger's ratio (total noise) per quantized layer, and "all"
    metrics: dict[str, float]  # every definition over all quantized weights, and the norms behind them


def noise_table(gradient: Callable[[str], torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """[layers, COLUMNS] squared norms from gradient(pass) -> flat FP32 gradient of the quantized weights.

    `gradient` returns the global-batch gradient already reduced over DP/CP, layers concatenated in the
    order of `sizes`. At most two gradients are held at once besides the one being computed.
    """

    def per_layer(v: torch.Tensor) -> torch.Tensor:
        return torch.stack([s.square().sum() for s in v.split(sizes)]) if sizes else v.new_zeros(0)

    g_fp = gradient("full")
    g_q = gradient("quantized")
    cols = [per_layer(g_fp), per_layer(g_q - g_fp)]
    del g_fp
    cols.append(per_layer(g_q - gradient("redraw")))
    g_hp = gradient("qaf")
    cols += [per_layer(g_hp), per_layer(g_q - g_hp)]
    return torch.stack(cols, dim=1).double()


def _ratio(signal_sq: float, noise_sq: float) -> float:
    return math.sqrt(signal_sq / noise_sq) if noise_sq > 0 else math.inf  # no noise: backward not quantized


def noise_probe(names: list[str], table) -> NoiseProbe | None:
    """NoiseProbe from the per-layer squared norms (rows in `names` order); None when nothing is quantized."""
    rows = [dict(zip(COLUMNS, map(float, row))) for row in table]
    if not rows:
        return None
    ratios = {n: _ratio(r["grad"], r["total"]) for n, r in zip(names, rows)}
    tot = {c: sum(r[c] for r in rows) for c in COLUMNS}
    ratios["all"] = _ratio(tot["grad"], tot["total"])
    metrics = {
        "backward": _ratio(tot["grad_qaf"], tot["backward"]),
        "sr": _ratio(tot["grad"], tot["sr_pair"] / 2),
        "grad_norm": math.sqrt(tot["grad"]),
        "noise_total": math.sqrt(tot["total"]),
        "noise_backward": math.sqrt(tot["backward"]),
        "noise_sr": math.sqrt(tot["sr_pair"] / 2),
    }
    return NoiseProbe(ratios, metrics)


def _dp_average(flat: torch.Tensor) -> torch.Tensor:
    """Mean over data-parallel ranks, as DDP averages the gradients the optimizer applies."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
    return flat


def probe_quantization_noise(
    model, micro_batches, loss_fn, step: int, average=_dp_average
) -> NoiseProbe | None:
    """The probe on a model converted by convert_model (torch engine).

    micro_batches: this rank's share of one global batch, on the model's device; loss_fn(model, mb) the
    micro-batch's mean loss under the training autocast. The loss is averaged over micro-batches as
    train_step does, and `average` reduces each pass's gradient over ranks before norms are taken.
    """
    layers = quantized_layers(model)
    if not layers:
        return None
    weights = [m.weight for m in layers.values()]
    sizes = [w.numel() for w in weights]
    key_a, key_b = probe_keys(step)
    n = len(micro_batches)

    def gradient(kind: str) -> torch.Tensor:
        with ExitStack() as modes:
            if kind == "full":
                modes.enter_context(unquantized(model))
            else:
                modes.enter_context(backward_mode(model, high_precision=kind == "qaf"))
                modes.enter_context(sr_stream(model, key_b if kind == "redraw" else key_a))
            total = None
            for mb in micro_batches:
                grads = torch.autograd.grad(loss_fn(model, mb) / n, weights)
                flat = torch.cat([g.detach().float().reshape(-1) for g in grads])
                total = flat if total is None else total.add_(flat)
        return average(total)

    device = weights[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        table = noise_table(gradient, sizes)
    return noise_probe(list(layers), table)
