"""The engine-agnostic training loop: schedule, logging, eval, checkpoints, signals, NaN policy, precision phases."""

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llmtrain.data import build_data
from llmtrain.dist import any_rank, close_process_group, dist_info_from_env
from llmtrain.engines.select import build_engine
from llmtrain.errors import CheckpointError, ConfigError, TrainingError
from llmtrain.metrics import MetricsLogger
from llmtrain.metrics.flops import device_peak_tflops
from llmtrain.metrics.warning_log import LOG_NAME, route_third_party_warnings
from llmtrain.models import ModelSpec
from llmtrain.precision import PrecisionController
from llmtrain.precision.phases import is_qaf
from llmtrain.train import rng
from llmtrain.train.checkpoint import CheckpointManager
from llmtrain.train.run_dir import resume_point
from llmtrain.train.schedule import schedule_from_config
from llmtrain.train.signals import stop_request


@dataclass
class RunSummary:
    run_dir: Path
    steps_done: int
    final_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None
    resumed_from: Path | None = None


_FIND = object()  # train(resume_dir=...) default: find the resume point here


def _settle_save_in_flight(ckpt: CheckpointManager, exc: BaseException, world_size: int) -> None:
    """The run is ending with `exc`: finish an async save in flight, or discard it, never leave it.

    Finishing needs every rank; that is safe when this process is alone or the error is one every rank
    raises together (divergence, an agreed checkpoint error). Otherwise the other ranks may be gone: let
    the write end and remove its temp dir, `latest` still naming the previous checkpoint."""
    if not ckpt.in_flight:
        return
    if world_size == 1 or isinstance(exc, TrainingError | CheckpointError):
        try:
            ckpt.wait()
        except CheckpointError as e:  # the run's own error is the one to report
            warnings.warn(f"the checkpoint being written when the run stopped failed too: {e}", stacklevel=2)
    else:
        ckpt.abandon()


def train(cfg, run_dir: Path, *, after_preemption=None, resume_dir=_FIND) -> RunSummary:
    """Run (or resume) the configured training in `run_dir`. All ranks call this.

    `resume_dir`: the checkpoint to resume (None: start fresh), as `run_dir.plan_run` decided it before
    anything was written; by default it is found here (train.resume, checked the same way).
    The process group llmtrain creates is destroyed when the run ends, however it ends; third-party warnings
    go to `run_dir`/train.log meanwhile (llmtrain.metrics.warning_log).
    """
    dist = dist_info_from_env()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(close_process_group)  # also when building the engine fails after creating the group
        log = run_dir / LOG_NAME
        cleanup.enter_context(route_third_party_warnings(log, rank=dist.rank, echo=dist.is_main))
        return _train(cfg, run_dir, dist, cleanup, after_preemption, resume_dir)


def _train(
    cfg, run_dir: Path, dist, cleanup: contextlib.ExitStack, after_preemption, resume_dir
) -> RunSummary:
    stop, own_stop = stop_request()  # before the slow part: a signal while loading is acknowledged
    if resume_dir is _FIND:
        resume_dir = resume_point(cfg, run_dir, cfg.engine.name if cfg.engine.name != "auto" else None)
    rng.seed_everything(cfg.train.seed + dist.rank)
    engine = build_engine(cfg, dist)
    cleanup.callback(engine.close)
    data = build_data(cfg, dp_rank=engine.dp_rank, dp_size=engine.dp_size)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"the tokenizer has {data.vocab_size} tokens; set model.vocab_size >= {data.vocab_size}",
        )
    device = getattr(engine, "device", torch.device("cpu"))
    ckpt = CheckpointManager(
        run_dir / "checkpoints",
        keep_last=cfg.train.keep_last,
        is_main=dist.is_main,
        barrier=engine.barrier,
        agree=lambda flag: any_rank(flag, device),
    )
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    controller = PrecisionController(
        cfg.precision, cfg.train.steps, optim=cfg.optim, tokens_per_step=tokens_per_step
    )
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    start_step, nan_skips, consumed, data_note = 0, 0, 0, None
    if resume_dir is not None:
        engine.load(resume_dir)
        trainer_state = torch.load(resume_dir / "trainer.pt", weights_only=True)
        start_step, nan_skips = trainer_state["step"], trainer_state["nan_skips"]
        # The data position is the samples consumed (older checkpoints: steps x this run's batch size).
        consumed = int(trainer_state.get("consumed_samples", start_step * cfg.train.global_batch_size))
        saved_order = trainer_state.get("data_fingerprint")
        if saved_order != data.fingerprint:
            data_note = (
                f"data order differs from the checkpoint's ({saved_order or 'not recorded'} -> "
                f"{data.fingerprint}: data, split, seed, seq_length or sampler changed); continuing at sample "
                f"{consumed} of the new order"
            )
        controller.load_state_dict(trainer_state["precision"])
        if controller.phase:
            engine.set_phase(controller.recipe)
        rank_file = resume_dir / f"rng_rank{dist.rank:05d}.pt"
        if rank_file.exists():
            rng.restore(torch.load(rank_file, weights_only=True))

    logger = MetricsLogger(
        cfg, run_dir, OmegaConf.to_container(cfg, resolve=True), is_main=dist.is_main, start_step=start_step
    )
    logger.info(f"engine: {engine.backend_description}; dp={engine.dp_size}")
    if resume_dir is not None:
        logger.info(f"resumed from {resume_dir} (step {start_step}, sample {consumed})")
        if controller.phase:
            logger.info(f"precision phase {controller.phase_name!r} (since step {controller.starts[-1]})")
    if data_note:
        logger.info(f"warning: {data_note}")

    spec = ModelSpec.from_config(cfg.model)
    peak = device_peak_tflops(getattr(engine, "device", torch.device("cpu")))
    lr_at = schedule_from_config(cfg.optim, controller.base_steps)  # appended phases have their own
    valid = data.valid_batches(cfg.train.eval_steps) if cfg.train.eval_interval > 0 else []
    eval_bf16 = bool(cfg.train.eval_bf16) and cfg.precision.name != "bf16"
    last_loss, last_ckpt, stopped_by, steps_done = None, None, None, start_step

    def save(step_no: int, background: bool) -> dict:
        """Checkpoint after step `step_no`; returns the step-time cost for the metrics record."""
        t0 = time.perf_counter()
        args = (
            step_no,
            engine,
            {
                "step": step_no,
                "nan_skips": nan_skips,
                "precision": controller.state_dict(),
                "consumed_samples": consumed,
                "data_fingerprint": data.fingerprint,
            },
            rng.capture(),
            dist.rank,
            config_yaml,
            {"engine": engine.name, "model": cfg.model.name},
        )
        if background:
            waited = ckpt.save_async(*args)
        else:
            waited = ckpt.wait()  # a save still in flight (save() would wait too; timed apart here)
            ckpt.save(*args)
        # checkpoint_s: what the save cost this step (async: the wait for the previous one + the snapshot)
        return {"checkpoint_s": time.perf_counter() - t0, "checkpoint_wait_s": waited}

    try:
        if any_rank(stop.requested, device):  # a signal during start-up or the checkpoint load
            stopped_by = stop.signal_name or "signal on another rank"
            logger.info(f"stopped by {stopped_by} before step {start_step + 1}; nothing new to save")
            last_ckpt = resume_dir
            if after_preemption is not None:
                after_preemption(cfg, run_dir)
        for step in range(start_step, cfg.train.steps if stopped_by is None else start_step):
            step_no = step + 1
            t0 = time.perf_counter()
            batches = data.batch_at(consumed)
            consumed += cfg.train.global_batch_size
            lr = controller.learning_rate(step, lr_at)
            phase_name = controller.phase_name
            engine.begin_step(step_no)
            result = engine.train_step(batches, lr)
            dt = time.perf_counter() - t0
            steps_done = step_no
            record = {
                "step": step_no,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens": consumed * cfg.model.seq_length,
                "tokens_per_s": tokens_per_step / dt,
                "step_time_s": dt,
            }
            if controller.active:
                record["phase"] = phase_name
            if peak:
                record["mfu"] = (
                    spec.flops_per_token() * tokens_per_step / dt / (peak * 1e12 * dist.world_size)
                )
            record |= engine.memory_stats()
            if result.skipped:
                nan_skips += 1
                record["skipped"] = True
                warnings.warn(
                    f"step {step_no}: non-finite loss/gradient ({result.loss}); update skipped "
                    f"({nan_skips}/{cfg.train.nan.max_skips} allowed)",
                    stacklevel=1,
                )
                if nan_skips > cfg.train.nan.max_skips:
                    logger.log_step(record, echo=True)
                    raise TrainingError(
                        f"training diverged: {nan_skips} non-finite steps (train.nan.max_skips="
                        f"{cfg.train.nan.max_skips}); last good checkpoint: {last_ckpt or ckpt.latest_valid()}; "
                        "lower optim.lr or raise train.nan.max_skips"
                    )
            else:
                last_loss = result.loss
            if controller.should_probe(step_no) and step_no < cfg.train.steps:
                # On the next step's batch: not trained on yet, and what the next update will see.
                probe = engine.probe_quantization_noise(data.batch_at(consumed), step_no)
                record |= controller.record_probe(step_no, probe)
            before = controller.recipe
            started = controller.advance(step_no)
            if started is not None:
                engine.set_phase(controller.recipe)
                record["phase_switch"] = started.name
                if is_qaf(before, controller.recipe):
                    record["qaf_switch"] = True  # forward quantized, backward now high precision
                logger.info(
                    f"step {step_no}: precision phase {started.name!r} (trigger {started.trigger}) from step "
                    f"{step_no + 1}: {controller.recipe.describe()}"
                )
            if valid and (step_no % cfg.train.eval_interval == 0 or step_no == cfg.train.steps):
                record["val_loss"] = engine.eval_loss(valid)
                if eval_bf16:  # the same weights with a BF16 forward, as NVIDIA evaluates FP4 models
                    record["val_loss_bf16"] = engine.eval_loss(valid, quantized=False)
            stop_now = any_rank(stop.requested, device)
            periodic = cfg.train.checkpoint_interval > 0 and step_no % cfg.train.checkpoint_interval == 0
            final = step_no == cfg.train.steps or stop_now  # the last save of the run is synchronous
            try:
                last_ckpt = ckpt.poll() or last_ckpt  # a background save completes (or its error surfaces)
                if periodic or final:
                    record |= save(step_no, background=cfg.train.checkpoint_async and not final)
                    last_ckpt = ckpt.last_saved or last_ckpt  # newest complete one (async: the previous)
            finally:
                echo = step_no % cfg.logging.interval == 0 or step_no == cfg.train.steps
                logger.log_step(record, echo=echo)
            if stop_now:
                stopped_by = stop.signal_name or "signal on another rank"
                logger.info(f"stopped by {stopped_by} after step {step_no}; checkpoint {last_ckpt}")
                if after_preemption is not None:
                    after_preemption(cfg, run_dir)
                break
        else:
            if start_step >= cfg.train.steps and stopped_by is None:
                logger.info(f"nothing to do: already at step {start_step} of train.steps={cfg.train.steps}")
                last_ckpt = resume_dir
        ckpt.wait()  # no run ends with a save half written
    except BaseException as exc:
        _settle_save_in_flight(ckpt, exc, dist.world_size)
        raise
    finally:
        if own_stop:
            stop.uninstall()
        logger.close()
    return RunSummary(
        run_dir=run_dir,
        steps_done=steps_done,
        final_loss=last_loss,
        checkpoint=last_ckpt,
        stopped_by=stopped_by,
        resumed_from=resume_dir,
    )
