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
from llmtrain.errors import CheckpointError, TrainingError
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


def train(cfg, run_dir: Path, *, after_preemption=None, resume_dir=_FIND, on_ready=None) -> RunSummary:
    """Run (or resume) the configured training in `run_dir`. All ranks call this.

    `resume_dir`: the checkpoint to resume (None: start fresh), as `run_dir.plan_run` decided it before
    anything was written; by default it is found here (train.resume, checked the same way).
    `on_ready`: called once the engine and data are built and the checkpoint is loaded, before the metrics
    are touched (the CLI writes config.yaml then: a run refused while building leaves the run's as it was).
    The process group llmtrain creates is destroyed when the run ends, however it ends; third-party warnings
    go to `run_dir`/train.log meanwhile (llmtrain.metrics.warning_log).
    """
    dist = dist_info_from_env()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(close_process_group)  # also when building the engine fails after creating the group
        log = run_dir / LOG_NAME
        cleanup.enter_context(route_third_party_warnings(log, rank=dist.rank, echo=dist.is_main))
        return _train(cfg, run_dir, dist, cleanup, after_preemption, resume_dir, on_ready)


def _train(
    cfg, run_dir: Path, dist, cleanup: contextlib.ExitStack, after_preemption, resume_dir, on_ready=None
) -> RunSummary:
    stop, own_stop = stop_request()  # before the slow part: a signal while loading is acknowledged
    if own_stop:  # however the run ends, a failed engine build included: the caller's handlers come back
        cleanup.callback(stop.uninstall)
    if resume_dir is _FIND:
        resume_dir = resume_point(cfg, run_dir, cfg.engine.name if cfg.engine.name != "auto" else None)
    rng.seed_everything(cfg.train.seed + dist.rank)
    engine = build_engine(cfg, dist)
    cleanup.callback(engine.close)
    data = build_data(cfg, dp_rank=engine.dp_rank, dp_size=engine.dp_size)
    device = getattr(engine, "device", torch.device("cpu"))
    ckpt = CheckpointManager(
        run_dir / "checkpoints",
        keep_last=cfg.train.keep_last,
        is_main=dist.is_main,
        barrier=engine.barrier,
        agree=lambda flag: any_rank(flag, device),
    )
    run = _Run(cfg, run_dir, dist, engine, data, ckpt, device)
    data_note = run.resume(resume_dir) if resume_dir is not None else None
    if on_ready is not None:
        on_ready()
    run.logger = logger = MetricsLogger(
        cfg,
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        is_main=dist.is_main,
        start_step=run.steps_done,
    )
    run.log_start(resume_dir, data_note)
    run.prepare_steps()
    try:
        run.train_steps(stop, resume_dir, after_preemption)
        ckpt.wait()  # no run ends with a save half written
    except BaseException as exc:
        _settle_save_in_flight(ckpt, exc, dist.world_size)
        raise
    finally:
        logger.close()
    return RunSummary(
        run_dir=run_dir,
        steps_done=run.steps_done,
        final_loss=run.last_loss,
        checkpoint=run.last_ckpt,
        stopped_by=run.stopped_by,
    )


class _Run:
    """One run's parts and progress, shared by train()'s helpers: resume, step, log, checkpoint."""

    def __init__(self, cfg, run_dir: Path, dist, engine, data, ckpt: CheckpointManager, device):
        self.cfg, self.run_dir, self.dist, self.device = cfg, run_dir, dist, device
        self.engine, self.data, self.ckpt = engine, data, ckpt
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.controller = PrecisionController(
            cfg.precision, cfg.train.steps, optim=cfg.optim, tokens_per_step=self.tokens_per_step
        )
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.logger: MetricsLogger | None = None
        # progress: steps done, non-finite steps skipped, global samples consumed (the data position)
        self.steps_done, self.nan_skips, self.consumed = 0, 0, 0
        self.last_loss, self.last_ckpt, self.stopped_by = None, None, None
        # spec, peak, lr_at, valid, eval_bf16: prepare_steps(), after the start is logged (as it always was)

    # ---- resume --------------------------------------------------------------------------------------
    def resume(self, resume_dir: Path) -> str | None:
        """Restore engine, progress, precision phase and this rank's RNG from `resume_dir`; returns a warning
        if the data order differs from the checkpoint's."""
        cfg, engine, controller, data = self.cfg, self.engine, self.controller, self.data
        engine.load(resume_dir)
        trainer_state = torch.load(resume_dir / "trainer.pt", weights_only=True)
        self.steps_done, self.nan_skips = trainer_state["step"], trainer_state["nan_skips"]
        # The data position is the samples consumed (older checkpoints: steps x this run's batch size).
        self.consumed = int(
            trainer_state.get("consumed_samples", self.steps_done * cfg.train.global_batch_size)
        )
        data_note = None
        saved_order = trainer_state.get("data_fingerprint")
        if saved_order != data.fingerprint:
            data_note = (
                f"data order differs from the checkpoint's ({saved_order or 'not recorded'} -> "
                f"{data.fingerprint}: data, split, seed, seq_length or sampler changed); continuing at sample "
                f"{self.consumed} of the new order"
            )
        controller.load_state_dict(trainer_state["precision"])
        if controller.phase:
            engine.set_phase(controller.recipe)
        rank_file = resume_dir / f"rng_rank{self.dist.rank:05d}.pt"
        if rank_file.exists():
            rng.restore(torch.load(rank_file, weights_only=True))
        return data_note

    # ---- log -----------------------------------------------------------------------------------------
    def log_start(self, resume_dir: Path | None, data_note: str | None) -> None:
        logger, controller = self.logger, self.controller
        logger.info(f"engine: {self.engine.backend_description}; dp={self.engine.dp_size}")
        if resume_dir is not None:
            logger.info(f"resumed from {resume_dir} (step {self.steps_done}, sample {self.consumed})")
            if controller.phase:
                logger.info(f"precision phase {controller.phase_name!r} (since step {controller.starts[-1]})")
        if data_note:
            logger.info(f"warning: {data_note}")

    def step_record(self, step_no: int, lr: float, phase_name, result, dt: float) -> dict:
        """The metrics record of one optimizer step (before eval, probe and checkpoint add to it)."""
        record = {
            "step": step_no,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens": self.consumed * self.cfg.model.seq_length,
            "tokens_per_s": self.tokens_per_step / dt,
            "step_time_s": dt,
        }
        if self.controller.active:
            record["phase"] = phase_name
        if self.peak:
            record["mfu"] = (
                self.spec.flops_per_token()
                * self.tokens_per_step
                / dt
                / (self.peak * 1e12 * self.dist.world_size)
            )
        record |= self.engine.memory_stats()
        return record

    # ---- step ----------------------------------------------------------------------------------------
    def prepare_steps(self) -> None:
        """What every step uses: the model's FLOPs, the device peak, the LR schedule, the eval batches."""
        cfg = self.cfg
        self.spec = ModelSpec.from_config(cfg.model)
        self.peak = device_peak_tflops(self.device)
        self.lr_at = schedule_from_config(
            cfg.optim, self.controller.base_steps
        )  # appended phases have their own
        self.valid = self.data.valid_batches(cfg.train.eval_steps) if cfg.train.eval_interval > 0 else []
        self.eval_bf16 = bool(cfg.train.eval_bf16) and cfg.precision.name != "bf16"

    def train_steps(self, stop, resume_dir: Path | None, after_preemption) -> None:
        """Step from the resume point to train.steps, or until a signal asks to stop."""
        cfg, start_step = self.cfg, self.steps_done
        if any_rank(stop.requested, self.device):  # a signal during start-up or the checkpoint load
            self.stopped_by = stop.signal_name or "signal on another rank"
            self.logger.info(
                f"stopped by {self.stopped_by} before step {start_step + 1}; nothing new to save"
            )
            self.last_ckpt = resume_dir
            if after_preemption is not None:
                after_preemption(cfg, self.run_dir)
        for step in range(start_step, cfg.train.steps if self.stopped_by is None else start_step):
            step_no = step + 1
            record = self.step(step)
            self.after_step(step_no, record)
            stop_now = any_rank(stop.requested, self.device)
            self.checkpoint_and_log(step_no, record, stop_now)
            if stop_now:
                self.stopped_by = stop.signal_name or "signal on another rank"
                self.logger.info(
                    f"stopped by {self.stopped_by} after step {step_no}; checkpoint {self.last_ckpt}"
                )
                if after_preemption is not None:
                    after_preemption(cfg, self.run_dir)
                break
        else:
            if start_step >= cfg.train.steps and self.stopped_by is None:
                self.logger.info(
                    f"nothing to do: already at step {start_step} of train.steps={cfg.train.steps}"
                )
                self.last_ckpt = resume_dir

    def step(self, step: int) -> dict:
        """Optimizer step `step` + 1 on the next global batch; its record; the NaN policy."""
        cfg, controller, engine = self.cfg, self.controller, self.engine
        step_no = step + 1
        t0 = time.perf_counter()
        batches = self.data.batch_at(self.consumed)
        self.consumed += cfg.train.global_batch_size
        lr = controller.learning_rate(step, self.lr_at)
        phase_name = controller.phase_name
        engine.begin_step(step_no)
        result = engine.train_step(batches, lr)
        dt = time.perf_counter() - t0
        self.steps_done = step_no
        record = self.step_record(step_no, lr, phase_name, result, dt)
        if result.skipped:
            self.skip_non_finite(step_no, result, record)
        else:
            self.last_loss = result.loss
        return record

    def skip_non_finite(self, step_no: int, result, record: dict) -> None:
        """The update was skipped (non-finite loss/gradient): count it; past train.nan.max_skips the run
        has diverged."""
        cfg = self.cfg
        self.nan_skips += 1
        record["skipped"] = True
        warnings.warn(
            f"step {step_no}: non-finite loss/gradient ({result.loss}); update skipped "
            f"({self.nan_skips}/{cfg.train.nan.max_skips} allowed)",
            stacklevel=1,
        )
        if self.nan_skips > cfg.train.nan.max_skips:
            self.logger.log_step(record, echo=True)
            raise TrainingError(
                f"training diverged: {self.nan_skips} non-finite steps (train.nan.max_skips="
                f"{cfg.train.nan.max_skips}); last good checkpoint: "
                f"{self.last_ckpt or self.ckpt.latest_valid() or 'none written yet'}; "
                "lower optim.lr or raise train.nan.max_skips"
            )

    def after_step(self, step_no: int, record: dict) -> None:
        """The sqrt(3) probe, a precision phase switch and the eval due after step `step_no`."""
        cfg, controller, engine = self.cfg, self.controller, self.engine
        if controller.should_probe(step_no) and step_no < cfg.train.steps:
            # On the next step's batch: not trained on yet, and what the next update will see.
            probe = engine.probe_quantization_noise(self.data.batch_at(self.consumed), step_no)
            record |= controller.record_probe(step_no, probe)
        before = controller.recipe
        started = controller.advance(step_no)
        if started is not None:
            engine.set_phase(controller.recipe)
            record["phase_switch"] = started.name
            if is_qaf(before, controller.recipe):
                record["qaf_switch"] = True  # forward quantized, backward now high precision
            self.logger.info(
                f"step {step_no}: precision phase {started.name!r} (trigger {started.trigger}) from step "
                f"{step_no + 1}: {controller.recipe.describe()}"
            )
        if self.valid and (step_no % cfg.train.eval_interval == 0 or step_no == cfg.train.steps):
            record["val_loss"] = engine.eval_loss(self.valid)
            if self.eval_bf16:  # the same weights with a BF16 forward, as NVIDIA evaluates FP4 models
                record["val_loss_bf16"] = engine.eval_loss(self.valid, quantized=False)

    # ---- checkpoint ----------------------------------------------------------------------------------
    def checkpoint_and_log(self, step_no: int, record: dict, stop_now: bool) -> None:
        """Save if due (periodic, the run's last step, or a stop), then write the step's record."""
        cfg, ckpt = self.cfg, self.ckpt
        periodic = cfg.train.checkpoint_interval > 0 and step_no % cfg.train.checkpoint_interval == 0
        final = step_no == cfg.train.steps or stop_now  # the last save of the run is synchronous
        try:
            self.last_ckpt = (
                ckpt.poll() or self.last_ckpt
            )  # a background save completes (or its error surfaces)
            if periodic or final:
                record |= self.save(step_no, background=cfg.train.checkpoint_async and not final)
                self.last_ckpt = (
                    ckpt.last_saved or self.last_ckpt
                )  # newest complete one (async: the previous)
        finally:
            echo = step_no % cfg.logging.interval == 0 or step_no == cfg.train.steps
            self.logger.log_step(record, echo=echo)

    def save(self, step_no: int, background: bool) -> dict:
        """Checkpoint after step `step_no`; returns the step-time cost for the metrics record."""
        ckpt, engine = self.ckpt, self.engine
        t0 = time.perf_counter()
        args = (
            step_no,
            engine,
            {
                "step": step_no,
                "nan_skips": self.nan_skips,
                "precision": self.controller.state_dict(),
                "consumed_samples": self.consumed,
                "data_fingerprint": self.data.fingerprint,
            },
            rng.capture(),
            self.dist.rank,
            self.config_yaml,
            {"engine": engine.name, "model": self.cfg.model.name},
        )
        if background:
            waited = ckpt.save_async(*args)
        else:
            waited = ckpt.wait()  # a save still in flight (save() would wait too; timed apart here)
            ckpt.save(*args)
        # checkpoint_s: what the save cost this step (async: the wait for the previous one + the snapshot)
        return {"checkpoint_s": time.perf_counter() - t0, "checkpoint_wait_s": waited}
