"""The engine-agnostic training loop: schedule, logging, eval, checkpoints, signals, NaN policy, QAF."""

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llmtrain.data import build_data
from llmtrain.dist import any_rank, dist_info_from_env
from llmtrain.engines.select import build_engine
from llmtrain.errors import ConfigError, TrainingError
from llmtrain.metrics import MetricsLogger
from llmtrain.metrics.flops import device_peak_tflops
from llmtrain.models import ModelSpec
from llmtrain.precision import PrecisionController
from llmtrain.train import rng
from llmtrain.train.checkpoint import CheckpointManager, resolve_checkpoint_path
from llmtrain.train.schedule import schedule_from_config
from llmtrain.train.signals import StopRequest


@dataclass
class RunSummary:
    run_dir: Path
    steps_done: int
    final_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None
    resumed_from: Path | None = None


def _find_resume_point(cfg, ckpt: CheckpointManager) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return ckpt.latest_valid()
    return resolve_checkpoint_path(mode)


def _nan_poisoned(batches):
    return [{**mb, "loss_mask": mb["loss_mask"] * float("nan")} for mb in batches]


def train(cfg, run_dir: Path, *, after_preemption=None) -> RunSummary:
    """Run (or resume) the configured training in `run_dir`. All ranks call this."""
    dist = dist_info_from_env()
    rng.seed_everything(cfg.train.seed + dist.rank)
    engine = build_engine(cfg, dist)
    data = build_data(cfg, dp_rank=engine.dp_rank, dp_size=engine.dp_size)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"the tokenizer has {data.vocab_size} tokens; set model.vocab_size >= {data.vocab_size}",
        )
    ckpt = CheckpointManager(
        run_dir / "checkpoints", keep_last=cfg.train.keep_last, is_main=dist.is_main, barrier=engine.barrier
    )
    controller = PrecisionController(cfg.precision, cfg.train.steps)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    start_step, nan_skips = 0, 0
    resume_dir = _find_resume_point(cfg, ckpt)
    if resume_dir is not None:
        engine.load(resume_dir)
        trainer_state = torch.load(resume_dir / "trainer.pt", weights_only=True)
        start_step, nan_skips = trainer_state["step"], trainer_state["nan_skips"]
        controller.load_state_dict(trainer_state["precision"])
        if controller.qaf_active:
            engine.set_qaf(True)
        rank_file = resume_dir / f"rng_rank{dist.rank:05d}.pt"
        if rank_file.exists():
            rng.restore(torch.load(rank_file, weights_only=True))

    logger = MetricsLogger(
        cfg, run_dir, OmegaConf.to_container(cfg, resolve=True), is_main=dist.is_main, start_step=start_step
    )
    logger.info(f"engine: {engine.backend_description}; dp={engine.dp_size}")
    if resume_dir is not None:
        logger.info(f"resumed from {resume_dir} (step {start_step})")

    spec = ModelSpec.from_config(cfg.model)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    peak = device_peak_tflops(getattr(engine, "device", torch.device("cpu")))
    lr_at = schedule_from_config(cfg.optim, cfg.train.steps)
    valid = data.valid_batches(cfg.train.eval_steps) if cfg.train.eval_interval > 0 else []
    eval_bf16 = bool(cfg.train.eval_bf16) and cfg.precision.name != "bf16"
    inject_nan = set(cfg.train.inject_nan_steps)
    stop = StopRequest().install()
    device = getattr(engine, "device", torch.device("cpu"))
    last_loss, last_ckpt, stopped_by, steps_done = None, None, None, start_step

    def save(step_no: int) -> Path:
        trainer_state = {
            "step": step_no,
            "nan_skips": nan_skips,
            "precision": controller.state_dict(),
            "consumed_samples": step_no * cfg.train.global_batch_size,
        }
        return ckpt.save(
            step_no,
            engine,
            trainer_state,
            rng.capture(),
            dist.rank,
            config_yaml,
            {"engine": engine.name, "model": cfg.model.name},
        )

    try:
        for step in range(start_step, cfg.train.steps):
            step_no = step + 1
            t0 = time.perf_counter()
            batches = data.train_batch(step)
            if step_no in inject_nan:
                batches = _nan_poisoned(batches)
            lr = lr_at(step)
            engine.begin_step(step_no)
            result = engine.train_step(batches, lr)
            dt = time.perf_counter() - t0
            steps_done = step_no
            record = {
                "step": step_no,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens": step_no * tokens_per_step,
                "tokens_per_s": tokens_per_step / dt,
                "step_time_s": dt,
            }
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
                probe = engine.probe_quantization_noise(data.train_batch(step_no), step_no)
                record |= controller.record_probe(step_no, probe)
            if controller.should_switch_qaf(step_no):
                engine.set_qaf(True)
                record["qaf_switch"] = True
                logger.info(f"step {step_no}: switched to quantization-aware finetuning (backward in BF16)")
            if valid and (step_no % cfg.train.eval_interval == 0 or step_no == cfg.train.steps):
                record["val_loss"] = engine.eval_loss(valid)
                if eval_bf16:  # the same weights with a BF16 forward, as NVIDIA evaluates FP4 models
                    record["val_loss_bf16"] = engine.eval_loss(valid, quantized=False)
            logger.log_step(record, echo=step_no % cfg.logging.interval == 0 or step_no == cfg.train.steps)

            stop_now = any_rank(stop.requested, device)
            periodic = cfg.train.checkpoint_interval > 0 and step_no % cfg.train.checkpoint_interval == 0
            if periodic or step_no == cfg.train.steps or stop_now:
                last_ckpt = save(step_no)
            if stop_now:
                stopped_by = stop.signal_name or "signal on another rank"
                logger.info(f"stopped by {stopped_by} after step {step_no}; checkpoint {last_ckpt}")
                if after_preemption is not None:
                    after_preemption(cfg, run_dir)
                break
        else:
            if start_step >= cfg.train.steps:
                logger.info(f"nothing to do: already at step {start_step} of train.steps={cfg.train.steps}")
                last_ckpt = resume_dir
    finally:
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
