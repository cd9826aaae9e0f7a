"""Model + optimizer state through Megatron-Core dist_checkpointing (torch_dist format).

Written into `<directory>/megatron` so the loop's own files (trainer state, manifest) sit beside it. The
distributed optimizer uses the `dp_reshardable` format: a run can resume with a different DP size.
Every rank saves its own shards in parallel (fully parallel strategy over the DP group).

Async saves (`start_save`) take Megatron-Core's own async path, `dist_checkpointing.save(...,
async_sharded_save=True)`: planning, the common state and the D2H copy of every shard happen now; the
returned AsyncRequest's write function runs later in llmtrain's background thread, and its finalize
functions (metadata, collective) at a step boundary on every rank. Not Megatron's AsyncCallsQueue: its
callers hand the write results back through a spawned Manager process (or a persistent spawned worker),
which the SIGTERM of a preemption kills while the save is being written (see keep_write_results_in_process).
"""

import inspect
from pathlib import Path

import torch

from llmtrain.engines.megatron_engine.settings import CKPT_METADATA
from llmtrain.errors import CheckpointError

SUBDIR = "megatron"


def _sharded_state_dict(models: list, optimizer, is_loading: bool) -> dict:
    metadata = dict(CKPT_METADATA)
    state = {}
    if len(models) == 1:
        state["model"] = models[0].sharded_state_dict(metadata=metadata)
    else:  # virtual pipeline stages: one entry per chunk, as Megatron-LM names them
        for i, m in enumerate(models):
            state[f"model{i}"] = m.sharded_state_dict(metadata=metadata)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def keep_write_results_in_process() -> None:
    """Keep the write results in this process.

    Megatron's torch_dist writer hands its results through a queue served by a spawned
    multiprocessing.Manager process, which exists for asynchronous saves. Ours are synchronous, and a
    SIGTERM to the whole process group (SLURM preemption or time limit, `timeout`) kills that helper just
    when the final checkpoint is being written: seen on the GPU host as ConnectionRefusedError in
    write_preloaded_data_multithread. A thread-safe in-process queue does the same job and cannot die.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    current = getattr(filesystem_async, "_results_queue", False)  # False: renamed (the unit test fails)
    if current is not False and not isinstance(current, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def _save_args(models: list, optimizer, directory: Path) -> tuple[dict, str, dict]:
    """Collective. dist_checkpointing.save's (state, path, keyword arguments) for both save paths."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    keep_write_results_in_process()  # for the sync save and for our background thread alike
    path = directory / SUBDIR
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())
    state = _sharded_state_dict(models, optimizer, is_loading=False)
    return state, str(path), {"sharded_strategy": strategy, "content_metadata": dict(CKPT_METADATA)}


def save(models: list, optimizer, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    state, path, kwargs = _save_args(models, optimizer, directory)
    dist_checkpointing.save(state, path, **kwargs)


def host_snapshot(write_buckets: list) -> list:
    """Megatron's write buckets with every tensor copied to host memory now (its own preload leaves a
    tensor already on the CPU as it is, which training would then change under the background write)."""
    out = []
    for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
        tensors = [(item, t.detach().to("cpu", copy=True)) for item, t in tensor_data]
        out.append((file_name, storage_key, (bytes_data, tensors)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def start_save(models: list, optimizer, directory: Path):
    """Collective. Snapshot now, write later: returns a PendingWrite (see the module docstring)."""
    from megatron.core import dist_checkpointing

    state, path, kwargs = _save_args(models, optimizer, directory)
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        # Megatron-Core >= 0.19 defaults to nvidia-resiliency-ext's writer ("nvrx"), which is not a dependency
        # (and not installed on the 2026-12-07 H100 host): its own writer is the one this module drives.
        kwargs["async_strategy"] = "mcore"
    request = dist_checkpointing.save(state, path, async_sharded_save=True, **kwargs)
    return pending_write(request)


def pending_write(request):
    """A Megatron AsyncRequest as llmtrain's PendingWrite, its shards snapshotted to host memory now."""
    from llmtrain.engines.base import PendingWrite

    write_fn, args = request.async_fn, list(request.async_fn_args)
    if write_fn is not None:
        if len(args) != 3:  # (rank, write_buckets, results_queue) in megatron-core 0.16-0.19
            raise RuntimeError(
                f"unexpected Megatron AsyncRequest arguments ({len(args)}); update pending_write"
            )
        args[1] = host_snapshot(args[1])

    def write() -> None:
        if write_fn is not None:
            write_fn(*args, **request.async_fn_kwargs)

    def finalize() -> None:
        for fn in request.finalize_fns:
            fn()

    return PendingWrite(write=write, finalize=finalize)


def load(models: list, optimizer, directory: Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    path = directory / SUBDIR
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: no Megatron-Core checkpoint there (metadata.json missing)")
    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), _dp_group())
    state = dist_checkpointing.load(
        _sharded_state_dict(models, optimizer, is_loading=True), str(path), sharded_strategy=strategy
    )
    if len(models) == 1:
        models[0].load_state_dict(state["model"])
    else:
        for i, m in enumerate(models):
            m.load_state_dict(state[f"model{i}"])
    optimizer.load_state_dict(state["optimizer"])
