"""The sqrt(3) monitor (its bookkeeping and the phase switch it triggers: controller.py).

Estimator (per quantized layer, on one micro-batch): run the quantized forward once, then two backwards
through the same graph, one with dgrad/wgrad quantized (what training uses) and one with them in high
precision (what QAF uses), and take the weight gradients G_q and G_hp:

    ratio = ||G_hp||_F / ||G_q - G_hp||_F

i.e. gradient norm over the norm of the noise that backward quantization adds (forward quantization is
common to both, so it is not counted: it is the part QAF keeps). "all" is the same ratio over all
quantized weights together. "FP4 All the Way" (Chmiel et al., 2025) finds quantized training stops
helping once this falls below about sqrt(3); with stochastic rounding G_q is one noisy draw, so single
probes fluctuate and the switch waits for `qaf.patience` consecutive probes below the threshold.
"""

import torch

from llmtrain.precision.convert import quantized_layers


def probe_quantization_noise(model, micro_batch, loss_fn) -> dict[str, float]:
    """Per-layer ratios (module name -> ratio) plus "all"; {} when nothing is quantized.

    The parameters' .grad, the layers' QAF mode and the weights are left untouched. Under data
    parallelism the squared norms are summed over ranks (each probes its own micro-batch).
    """
    layers = quantized_layers(model)
    if not layers:
        return {}
    mods, weights = list(layers.values()), [m.weight for m in layers.values()]
    modes = [m.qaf for m in mods]
    try:
        for m in mods:
            m.qaf = False
        loss = loss_fn(model, micro_batch)
        g_q = torch.autograd.grad(loss, weights, retain_graph=True)
        for m in mods:
            m.qaf = True
        g_hp = torch.autograd.grad(loss, weights)
    finally:
        for m, mode in zip(mods, modes):
            m.qaf = mode
    sq = torch.stack(
        [
            torch.stack([b.float().square().sum(), (a.float() - b.float()).square().sum()])
            for a, b in zip(g_q, g_hp)
        ]
    )  # [layers, 2]: ||G_hp||^2, ||G_q - G_hp||^2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Sum over data-parallel ranks so every rank logs the same ratios and takes the same QAF decision.
        torch.distributed.all_reduce(sq)
    norms = sq.sqrt()
    ratios = (norms[:, 0] / norms[:, 1]).tolist()  # x/0 = inf: backward not quantized (or exact)
    out = dict(zip(layers, ratios))
    total = sq.sum(0).sqrt()
    out["all"] = (total[0] / total[1]).item()
    return out
