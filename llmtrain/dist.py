"""This process's place in the job and the one default process group llmtrain creates: read torchrun/SLURM
env, init torch.distributed once (engines, checkpoint conversion and dry_run=measure all come here)."""

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    """This process's place in the job (torchrun / SLURM environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID."""
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
        )
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


_created = False  # llmtrain created the default process group, so llmtrain also destroys it
_groups_made = 0  # default groups this process created (a sweep under torchrun makes one per point)


def init_process_group(
    dist: DistInfo, backend: str, *, single_process: bool = False, store: object | None = None
) -> bool:
    """Initialise the default process group for multi-process runs (for one process too if `single_process`,
    as Megatron and its dist_checkpointing need); an existing group (a caller's or a test's) is used as it
    is. `store`: a ready rendezvous store (dry_run=measure's FakeStore). True if this call created the group;
    close_process_group() destroys it."""
    global _created
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    if dist.world_size == 1 and not single_process:
        return False
    # One process needs no rendezvous: an in-memory store, so no TCP port can collide with another run's
    # (or a test process's) group, and MASTER_ADDR/MASTER_PORT left in the environment are never used.
    if store is None and dist.world_size == 1:
        store = torch.distributed.HashStore()
    global _groups_made
    timeout = datetime.timedelta(minutes=30)
    if store is None and _groups_made and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # A later group in this process (a sweep's next point under torchrun): env:// would rendezvous in the
        # agent's store under the first group's keys (gloo then dials its dead peers: a hang). Its own prefix.
        agent = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        store = torch.distributed.PrefixStore(f"llmtrain/group{_groups_made}", agent)
    torch.distributed.init_process_group(
        backend=backend,
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=timeout,
        store=store,
    )
    _created, _groups_made = True, _groups_made + 1
    return True


def groups_made() -> int:
    """How many default process groups this process created (llmtrain.process_exit asks)."""
    return _groups_made


def close_process_group() -> None:
    """Destroy the default process group if llmtrain created it; idempotent. Without this, NCCL warns at
    exit that `destroy_process_group() was not called`."""
    global _created
    if _created and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _created = False


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is set on any rank (a signal may reach only some of them)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
