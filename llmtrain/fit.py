"""Refuse runs that cannot fit this machine (or, for a submission, the planned GPUs), before spending minutes
building or queueing them."""

import os

from llmtrain.config.estimate import GIB, estimate_memory, layout_of
from llmtrain.errors import UserError


def available_bytes(engine: str) -> tuple[float, str]:
    import torch  # here, not at import: preflight of a dry run or a submission never asks the GPU

    if engine == "megatron" or torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"{props.name} with {props.total_memory / GIB:.0f} GiB"
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return float(pages * page_size), f"this CPU-only machine with {pages * page_size / GIB:.0f} GiB RAM"


def check_fits(cfg, world: int, engine: str) -> None:
    if engine == "torch" and cfg.train.device == "cuda":  # before the run dir is written, not at engine build
        from llmtrain.engines.select import check_cuda_available

        check_cuda_available(cfg.train.device)
    if not cfg.train.check_memory:
        return
    need = estimate_memory(cfg, layout_of(cfg, world), engine).total
    have, what = available_bytes(engine)
    if need > have:
        raise UserError(
            f"{cfg.model.name} needs ~{need / GIB:.0f} GiB per {'GPU' if engine == 'megatron' else 'process'} "
            f"(engine={engine}, world {world}) but runs on {what}; inspect with dry_run=true, use GPUs with "
            "more parallelism (engine=megatron, parallel.*), pick a smaller recipe (recipe=tiny), or skip "
            "this check with train.check_memory=false"
        )


def check_fits_planned(cfg, world: int, engine: str) -> None:
    """A submission: the estimate per GPU against cluster.gpu_memory_gib (the login node's memory says
    nothing about the job's GPUs). Refused only over 100%, as check_fits; the dry run warns at 90%."""
    if not cfg.train.check_memory or engine != "megatron":
        return
    need, have = (
        estimate_memory(cfg, layout_of(cfg, world), engine).total / GIB,
        float(cfg.cluster.gpu_memory_gib),
    )
    if need > have:
        raise UserError(
            f"{cfg.model.name} needs ~{need:.1f} GiB per GPU (world {world}) but cluster.gpu_memory_gib={have:g}; "
            "set cluster.gpu_memory_gib to your GPUs' memory (H200 ~139, B200 ~178), spread it over more GPUs "
            "(cluster.nodes, parallel.tp/pp/cp) or parallel.recompute=full (inspect with dry_run=true), or "
            "skip this check with train.check_memory=false"
        )
