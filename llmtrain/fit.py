"""Refuse runs that cannot fit this machine, before spending minutes building them."""

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
