"""`dry_run=measure`: one rank of the planned world, built and stepped for real on this one GPU.

How: torch's fake process-group backend (`backend="fake"` with a FakeStore), as Megatron-LM's
`--fake-process-group` does: this process joins a world of cluster.nodes x cluster.gpus_per_node ranks as
rank `measure.rank`, Megatron-Core builds that rank's real model shard, DDP buffers and (distributed)
optimizer for the real layout (TP/PP with virtual stages/CP/DP), and a few real forward/backward/optimizer
steps run on mock tokens. Every collective and p2p transfer returns at once without moving data, so shapes,
sharding and memory are this rank's real ones while losses, received activations (pipeline stages > 0,
CP/TP peers) and communication times are not. The measured peak is printed next to the dry-run estimate,
per component, then the process exits.

What is patched, and why:
- no gloo process groups (engine.py asks for none under the fake backend): a FakeStore stores nothing, and
  only checkpointing could use them;
- no skipped updates (loss_scale=None: Megatron's BF16 optimizer then has no grad scaler and no inf/NaN
  check): garbage from the no-op collectives can make gradients non-finite, and a skipped first step would
  never allocate the Adam state, so the measured peak would miss it.
"""

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from llmtrain.config.estimate import GIB, estimate_memory, layout_of
from llmtrain.config.validate import check_dry_run_value
from llmtrain.errors import ConfigError, UserError
from llmtrain.models import ModelSpec

NOT_REAL = (
    "NOT REAL: losses and communication. Collectives and pipeline transfers are no-ops (torch's fake "
    "process group), so this rank computes on garbage from its peers and the times exclude all "
    "communication; shapes, sharding and memory are this rank's real ones (NCCL's own buffers, outside "
    "PyTorch's allocator, are not counted)."
)


def resolve_rank(rank: int, world: int) -> int:
    """measure.rank -> a global rank of the planned world (-1: the last rank, i.e. the last stage)."""
    resolved = world - 1 if rank == -1 else rank
    if not 0 <= resolved < world:
        raise ConfigError(
            "measure.rank",
            rank,
            f"the planned world has ranks 0..{world - 1} (cluster.nodes x cluster.gpus_per_node = {world}); "
            "use -1 for the last rank",
        )
    return resolved


def check_request(cfg, world: int, engine: str) -> int:
    """Refuse, in one line, what the measurement cannot do faithfully; return the rank to emulate."""
    check_dry_run_value(cfg.dry_run)
    if engine != "megatron":
        raise ConfigError(
            "engine", cfg.engine.name, "dry_run=measure measures the Megatron engine", ["megatron", "auto"]
        )
    if cfg.train.device == "cpu":
        raise ConfigError("train.device", "cpu", "dry_run=measure runs on a CUDA GPU", ["auto", "cuda"])
    if cfg.measure.steps < 1:
        raise ConfigError("measure.steps", cfg.measure.steps, "must be >= 1")
    if cfg.measure.micro_batches < 0:
        raise ConfigError("measure.micro_batches", cfg.measure.micro_batches, "must be >= 0 (0: automatic)")
    rank = resolve_rank(int(cfg.measure.rank), world)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise UserError(
            "dry_run=measure emulates the whole world in one process; start it with python -m llmtrain, "
            "not torchrun or srun with several tasks"
        )
    if not torch.cuda.is_available():
        raise UserError(
            "dry_run=measure builds one rank for real and needs a CUDA GPU; on this machine use "
            "dry_run=true (the estimate only)"
        )
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"dry_run=measure needs torch's fake process-group backend, which torch {torch.__version__} "
            f"lacks ({exc}); use torch >= 2.3"
        ) from None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise UserError("dry_run=measure needs a process without a process group; run it on its own")
    return rank


def default_micro_batches(grad_accum: int, pp: int) -> int:
    """Enough micro-batches for the schedule's peak: 2*pp fills the (interleaved) 1F1B warm-up of every
    stage and is a multiple of pp, as the interleaved schedule requires; 2 without pipelining, so the
    gradient-accumulation path runs too. Never more than a real step has."""
    return min(grad_accum, 2 * pp if pp > 1 else 2)


# ---- memory accounting -----------------------------------------------------------------------------------
def _leaf_tensors(t: torch.Tensor, name: str = ""):
    """(inner name, plain tensor) pairs that hold a tensor's bytes (TE's quantized tensors hold several:
    `_data`/`_rowwise_data`, `_transpose`/`_columnwise_data`, scales)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for inner_name in names:
            inner = getattr(t, inner_name)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner, inner_name)
    else:
        yield name, t


def _is_columnwise_copy(inner_name: str) -> bool:
    """TE's second layout of a quantized parameter (FP8's transpose, MX/NVFP4's column-wise data): the
    estimate books it as a low-precision weight copy, not as the parameter."""
    return "transpose" in inner_name or "columnwise" in inner_name


def storage_bytes(tensors, seen: set, *, columnwise: bool | None = None) -> int:
    """Bytes of the storages behind `tensors` not already in `seen` (views of one buffer count once);
    `columnwise` True/False: only TE's column-wise copies / everything else."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        for inner_name, leaf in _leaf_tensors(t):
            if columnwise is not None and _is_columnwise_copy(inner_name) != columnwise:
                continue
            storage = leaf.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _optimizer_tensors(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _moment_count(optimizer) -> int:
    return sum(
        len(getattr(opt, "optimizer", None).state)
        for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]
        if getattr(opt, "optimizer", None) is not None
    )


def resident_components(engine) -> dict[str, int]:
    """Bytes of the model's parameters (TE's column-wise copies of quantized ones apart), its gradient
    buffers and the optimizer's tensors (each buffer once)."""
    seen: set = set()
    params = [p for m in engine.models for p in m.parameters()]
    weights = storage_bytes(params, seen, columnwise=False)
    weight_copies = storage_bytes(params, seen, columnwise=True)
    grads = storage_bytes([getattr(p, "main_grad", None) for p in params], seen)
    optimizer = storage_bytes(_optimizer_tensors(engine.optimizer), seen)
    return {"weights": weights, "weight_copies": weight_copies, "grads": grads, "optimizer": optimizer}


@contextlib.contextmanager
def _updates_never_skipped():
    """Build the optimizer without a grad scaler (no inf/NaN skip): see the module docstring."""
    from llmtrain.engines.megatron_engine import settings

    original = settings.optimizer_config_kwargs

    def without_loss_scale(optim, parallel):
        return {**original(optim, parallel), "loss_scale": None}

    settings.optimizer_config_kwargs = without_loss_scale
    try:
        yield
    finally:
        settings.optimizer_config_kwargs = original


# ---- the run ---------------------------------------------------------------------------------------------
def measure(cfg, world: int, engine: str = "megatron") -> dict:
    """Emulate rank measure.rank of the planned world; the result as a JSON-able dict (GiB)."""
    rank = check_request(cfg, world, engine)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from llmtrain.dist import DistInfo, close_process_group, init_process_group

    # The fake backend's FakeStore: every collective returns at once, no other rank needs to exist.
    init_process_group(DistInfo(rank, world), "fake", single_process=True, store=FakeStore())
    try:
        return _measure(cfg, world, rank)
    finally:
        close_process_group()  # idempotent: the engine's close() may have destroyed it already


def _measure(cfg, world: int, rank: int) -> dict:
    from megatron.core import parallel_state as ps

    from llmtrain.dist import DistInfo
    from llmtrain.engines.megatron_engine.batches import mock_batches
    from llmtrain.engines.megatron_engine.engine import MegatronEngine

    spec = ModelSpec.from_config(cfg.model)
    lay = layout_of(cfg, world)
    props = torch.cuda.get_device_properties(0)
    n_mb = int(cfg.measure.micro_batches) or default_micro_batches(lay.grad_accum, lay.pp)
    out = {
        "model": spec.name,
        "precision": cfg.precision.name,
        "world": world,
        "rank": rank,
        "tp": lay.tp,
        "pp": lay.pp,
        "vpp": lay.vpp,
        "cp": lay.cp,
        "dp": lay.dp,
        "sequence_parallel": bool(cfg.parallel.sequence_parallel),
        "distributed_optimizer": bool(cfg.parallel.distributed_optimizer),
        "recompute": cfg.parallel.recompute,
        "micro_batch_size": int(cfg.train.micro_batch_size),
        "seq_length": spec.seq_length,
        "micro_batches_per_step": n_mb,
        "steps": int(cfg.measure.steps),
        "gpu": props.name,
        "gpu_gib": props.total_memory / GIB,
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
        "ok": False,
        "phase": "build",
    }
    torch.cuda.set_device(0)
    torch.cuda.reset_peak_memory_stats()
    eng, peak_before_last = None, 0
    try:
        with _updates_never_skipped():
            eng = MegatronEngine(cfg, DistInfo(rank=rank, world_size=world, local_rank=0))
        stage = ps.get_pipeline_model_parallel_rank()
        out.update(
            stage=stage,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            cp_rank=ps.get_context_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            backend=eng.backend_description,
            emulated=eng.emulated,
            lowp_param_gather=eng.lowp_param_gather,
            after_build_gib=torch.cuda.memory_allocated() / GIB,
        )
        batches = mock_batches(n_mb, int(cfg.train.micro_batch_size), spec.seq_length, spec.vocab_size)
        times = []
        for step in range(1, int(cfg.measure.steps) + 1):
            out["phase"] = f"step {step}"
            torch.cuda.synchronize()
            if step == int(cfg.measure.steps):  # the reported step starts from a clean peak counter
                peak_before_last = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            resident_before = torch.cuda.memory_allocated()
            eng.begin_step(step)
            t0 = time.perf_counter()
            eng.train_step(batches, lr=float(cfg.optim.lr))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_peak = torch.cuda.max_memory_allocated()
        resident = torch.cuda.memory_allocated()
        try:
            parts = resident_components(eng)
        except Exception as exc:  # the peak below still stands; say why the split is missing
            out["accounting_error"] = f"{type(exc).__name__}: {exc}"[:300]
            parts = {"weights": 0, "weight_copies": 0, "grads": 0, "optimizer": 0}
        measured = {k: v / GIB for k, v in parts.items()}
        measured["other_resident"] = (resident - sum(parts.values())) / GIB
        # what the estimate's "weight copies" stand for: TE's column-wise copies + its caches and workspaces
        measured["copies_and_other"] = measured["weight_copies"] + measured["other_resident"]
        measured["activations"] = (step_peak - resident_before) / GIB
        measured["peak"] = max(step_peak, peak_before_last) / GIB
        measured["last_step_peak"] = step_peak / GIB
        measured["reserved"] = torch.cuda.max_memory_reserved() / GIB
        out.update(
            ok=True,
            phase="done",
            measured=measured,
            optimizer_state_allocated=_moment_count(eng.optimizer) > 0,
            compute_s_per_step=times[-1],
        )
    except torch.cuda.OutOfMemoryError as exc:
        out["oom"] = True
        out["error"] = str(exc).splitlines()[0][:300]
        out["peak_before_oom_gib"] = max(torch.cuda.max_memory_allocated(), peak_before_last) / GIB
    except Exception as exc:  # recorded for scripts/measure_layouts.py, then raised as usual
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        raise
    finally:
        out.setdefault("stage", _stage_of(rank, lay))
        est = estimate_memory(
            cfg,
            lay,
            "megatron",
            stage=out["stage"],
            param_gather=out.get("lowp_param_gather"),
            emulated=out.get("emulated"),
        )
        out["estimate"] = {
            "weights": est.weights / GIB,
            "weight_copies": est.weight_copies / GIB,
            "grads": est.grads / GIB,
            "optimizer": est.optimizer / GIB,
            "activations": est.activations / GIB,
            "logits": est.logits / GIB,
            "total": est.total / GIB,
        }
        if eng is not None:
            with contextlib.suppress(Exception):
                eng.close()
        _append_json(cfg.measure.json, out)
    return out


def _stage_of(rank: int, lay) -> int:
    """Pipeline stage of a global rank in Megatron's tp-cp-dp-pp order (pp outermost)."""
    return rank // (lay.tp * lay.cp * lay.dp)


def _append_json(path, record: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- the report --------------------------------------------------------------------------------------------
ROWS = [  # (label, estimate key, measured key, how it is measured)
    ("weights", "weights", "weights", "parameter storage (each buffer once)"),
    ("lowp copies+", "weight_copies", "copies_and_other", "TE's column-wise weight copies + other resident"),
    ("grads", "grads", "grads", "DDP main-grad buffers (FP32)"),
    ("optimizer", "optimizer", "optimizer", "master weights + Adam moments, this rank's shard"),
    ("activations", "activations", "activations", "peak of the last step minus resident at its start"),
    ("peak", "total", "peak", "estimate total vs torch.cuda.max_memory_allocated"),
]


def report(r: dict) -> str:
    where = (
        f"rank {r['rank']} of {r['world']} (tp {r['tp']} x pp {r['pp']} (vpp {r['vpp']}) x cp {r['cp']} x "
        f"dp {r['dp']}), pipeline stage {r['stage']} of {r['pp']}"
    )
    lines = [
        f"measured dry run  {r['model']}, precision {r['precision']}, {where}, on one {r['gpu']} "
        f"({r['gpu_gib']:.0f} GiB, {r['capability']})",
        NOT_REAL,
    ]
    if "backend" in r:
        lines.append(f"engine            {r['backend']}")
    lines.append(
        f"steps             {r['steps']} x {r['micro_batches_per_step']} micro-batches of "
        f"{r['micro_batch_size']} x {r['seq_length']} tokens (mock data)"
        + (f"; this rank's compute, last step: {r['compute_s_per_step']:.2f} s" if r.get("ok") else "")
    )
    if r.get("emulated"):
        lines.append(
            f"note              {r['precision']} runs emulated on this {r['capability']} GPU (llmtrain's "
            "quantizers in TE); where TE runs it natively its weight copies and lowp_param_gather differ"
        )
    est = r["estimate"]
    if not r.get("ok"):
        what = "out of GPU memory" if r.get("oom") else "failed"
        lines.append(
            f"result            does NOT build here: {what} at {r['phase']} "
            f"(peak {r.get('peak_before_oom_gib', float('nan')):.1f} GiB; estimate {est['total']:.1f} GiB): "
            f"{r.get('error', '')}"
        )
        return "\n".join(lines)
    m = r["measured"]
    lines.append(f"{'memory (GiB)':<17} {'estimate':>9} {'measured':>9} {'off':>7}  measured as")
    for label, ek, mk, how in ROWS:
        e, v = est[ek], m.get(mk, m.get("other_resident", 0.0))  # records before the split: no copies key
        off = f"{(e - v) / v * 100:+.0f}%" if v > 0.05 else ""
        lines.append(f"  {label:<15} {e:9.2f} {v:9.2f} {off:>7}  {how}")
    lines.append(
        f"  {'reserved':<15} {'':>9} {m['reserved']:9.2f} {'':>7}  torch.cuda.max_memory_reserved (allocator cache)"
    )
    verdict = "within 10%" if abs(est["total"] - m["peak"]) <= 0.1 * m["peak"] else "OFF by more than 10%"
    fits = "fits" if m["reserved"] <= r["gpu_gib"] else "does not fit"
    lines.append(
        f"result            builds and steps; estimate {verdict} of the measured peak; {fits} this GPU"
        + ("" if r["optimizer_state_allocated"] else "; WARNING: no optimizer state was allocated")
    )
    if r.get("accounting_error"):
        lines.append(f"WARNING           no per-component split ({r['accounting_error']})")
    return "\n".join(lines)


def measure_report(cfg, world: int, engine: str) -> str:
    return report(measure(cfg, world, engine))
